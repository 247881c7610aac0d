# The Tandem image: one static binary (`tandem operator`, `tandem gateway`,
# `tandem crd`) on an empty base, running as a non-root user.
#
#   docker build -t ghcr.io/tandem-dev/tandem:0.1.0 .
#
# No container engine runs on the project's own machines: the demo and the
# chart tests run the same binary as the pods' process instead (see README).

FROM docker.io/library/rust:1.95-bookworm AS build
RUN rustup target add x86_64-unknown-linux-musl \
    && apt-get update && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY operator operator
COPY testenv testenv
RUN cargo build --locked --release -p tandem --bin tandem \
        --target x86_64-unknown-linux-musl \
    && cp target/x86_64-unknown-linux-musl/release/tandem /tandem

FROM scratch
COPY --from=build /tandem /tandem
# The chart's pods run as 65532 with a read-only root filesystem; Tandem
# writes no files.
USER 65532:65532
EXPOSE 8080 9090 9091 9092
ENTRYPOINT ["/tandem"]
