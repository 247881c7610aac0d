//! Logging and trace export shared by the subcommands.
//!
//! Logs go to stderr, plain or JSON. With `--otlp-endpoint`, spans of
//! Tandem's own code (a reconcile, a proxied request) are also exported as
//! OpenTelemetry traces over OTLP/HTTP (protobuf) through a batch processor
//! whose queue is bounded (`OTEL_BSP_MAX_QUEUE_SIZE`, 2,048 spans by
//! default: past it spans are dropped, never waited for).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// Trace export flags of `tandem operator` and `tandem gateway`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TraceArgs {
    /// Export traces over OTLP/HTTP (protobuf) to this collector
    /// (`http://collector:4318`: `/v1/traces` is added to a URL without a
    /// path). Off without it.
    #[arg(long, env = "TANDEM_OTLP_ENDPOINT", value_parser = parse_otlp_endpoint)]
    pub otlp_endpoint: Option<http::Uri>,

    /// Share of new traces recorded (0 to 1). A request whose `traceparent`
    /// says its caller records (or does not) is followed in that.
    #[arg(long, env = "TANDEM_TRACE_SAMPLE_RATIO", default_value_t = 1.0, value_parser = parse_ratio)]
    pub trace_sample_ratio: f64,
}

/// Parses a share from 0 to 1.
pub fn parse_ratio(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
        _ => Err(format!("{text}: expected a number from 0 to 1")),
    }
}

/// Parses an OTLP/HTTP collector URL; one without a path gets the traces
/// path, `/v1/traces`, as OTLP's base endpoints do.
pub fn parse_otlp_endpoint(text: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = text
        .trim()
        .parse()
        .map_err(|e| format!("{text}: not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "{text}: https is not supported; send to a collector (or its sidecar) over http"
            ));
        }
        _ => return Err(format!("{text}: expected http://host:port")),
    }
    if uri.authority().is_none() {
        return Err(format!("{text}: expected http://host:port"));
    }
    if uri.path() == "/" && uri.query().is_none() {
        let base = text.trim().trim_end_matches('/');
        return format!("{base}/v1/traces")
            .parse()
            .map_err(|e| format!("{text}: {e}"));
    }
    Ok(uri)
}

/// What must outlive the program's work: the trace exporter, flushed when
/// this is dropped.
#[must_use = "dropping it stops trace export"]
pub struct Telemetry {
    traces: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.traces.take()
            && let Err(error) = provider.shutdown_with_timeout(Duration::from_secs(5))
        {
            eprintln!("trace export did not finish: {error}");
        }
    }
}

/// Installs the global tracing subscriber (`RUST_LOG` overrides the log
/// level) and, with an OTLP endpoint, the trace exporter; `service` names
/// this process in traces unless `OTEL_SERVICE_NAME` does. Exports are
/// sent by tasks on `runtime`.
pub fn init(
    format: LogFormat,
    traces: &TraceArgs,
    service: &'static str,
    runtime: &tokio::runtime::Handle,
) -> anyhow::Result<Telemetry> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,kube_client::client::builder=warn".into());
    let Some(endpoint) = &traces.otlp_endpoint else {
        // Without export, the subscriber is the plain one: a global filter
        // keeps disabled callsites as cheap as they can be.
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr);
        match format {
            LogFormat::Plain => builder.with_ansi(false).init(),
            LogFormat::Json => builder.json().init(),
        }
        return Ok(Telemetry { traces: None });
    };
    let provider = tracer_provider(endpoint, traces.trace_sample_ratio, service, runtime)?;
    let tracer = provider.tracer("tandem");
    // Only Tandem's own spans become trace spans: the client libraries'
    // (kube, hyper) would bury them.
    let exported =
        tracing_subscriber::filter::Targets::new().with_target("tandem", tracing::Level::INFO);
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(exported);
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Plain => logs.with_ansi(false).with_filter(filter).boxed(),
        LogFormat::Json => logs.json().with_filter(filter).boxed(),
    };
    tracing_subscriber::registry().with(logs).with(otel).init();
    tracing::info!(endpoint = %endpoint, sample_ratio = traces.trace_sample_ratio, "exporting traces over OTLP");
    Ok(Telemetry {
        traces: Some(provider),
    })
}

fn tracer_provider(
    endpoint: &http::Uri,
    ratio: f64,
    service: &'static str,
    runtime: &tokio::runtime::Handle,
) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(CollectorClient::new(runtime.clone(), EXPORT_TIMEOUT))
        .with_endpoint(endpoint.to_string())
        .with_timeout(EXPORT_TIMEOUT)
        .build()?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service);
    }
    for (attribute, variable) in [
        ("k8s.pod.name", "POD_NAME"),
        ("k8s.namespace.name", "POD_NAMESPACE"),
    ] {
        if let Ok(value) = std::env::var(variable) {
            resource = resource.with_attribute(opentelemetry::KeyValue::new(attribute, value));
        }
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))))
        .with_resource(resource.build())
        .build())
}

/// Longest an export may take, response included.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest collector response read (its answer is a short status).
const MAX_COLLECTOR_RESPONSE: usize = 64 << 10;

/// Sends exports with hyper on the program's tokio runtime.
///
/// The SDK's batch processor exports from a thread of its own, outside any
/// runtime, where hyper's connections cannot run; each export is therefore
/// handed to a task on the runtime and its result awaited from there.
#[derive(Debug, Clone)]
struct CollectorClient {
    runtime: tokio::runtime::Handle,
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

impl CollectorClient {
    fn new(runtime: tokio::runtime::Handle, timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Self {
            runtime,
            client,
            timeout,
        }
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for CollectorClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        let timeout = self.timeout;
        let exchange = async move {
            let response = client.request(request.map(Full::new)).await?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_COLLECTOR_RESPONSE)
                .collect()
                .await?
                .to_bytes();
            Ok::<_, opentelemetry_http::HttpError>(http::Response::from_parts(parts, body))
        };
        let task = self
            .runtime
            .spawn(async move { tokio::time::timeout(timeout, exchange).await });
        match task.await? {
            Ok(answer) => answer,
            Err(_) => Err(format!("the collector did not answer within {timeout:?}").into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_without_a_path_gets_the_traces_path_and_others_are_refused() {
        let parsed = |s: &str| parse_otlp_endpoint(s).map(|u| u.to_string());
        assert_eq!(
            parsed("http://collector:4318").unwrap(),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            parsed("http://collector:4318/").unwrap(),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            parsed("http://collector:4318/otlp/v1/traces").unwrap(),
            "http://collector:4318/otlp/v1/traces"
        );
        assert!(
            parsed("https://collector:4318")
                .unwrap_err()
                .contains("https")
        );
        assert!(parsed("collector:4318").is_err());
        assert!(parsed("grpc://collector:4317").is_err());
    }

    #[test]
    fn a_ratio_is_from_0_to_1() {
        assert_eq!(parse_ratio("0.25"), Ok(0.25));
        assert_eq!(parse_ratio("1"), Ok(1.0));
        assert_eq!(parse_ratio("0"), Ok(0.0));
        assert!(parse_ratio("1.5").is_err());
        assert!(parse_ratio("-0.1").is_err());
        assert!(parse_ratio("NaN").is_err());
        assert!(parse_ratio("a tenth").is_err());
    }
}
