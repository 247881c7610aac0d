-- Argo CD health check of tandem.dev/HybridApp (resource.customizations.health
-- in argocd-cm; docs/gitops.md shows it in place). Tested with gopher-lua
-- against real HybridApps: operator/tests/integration/health.rs.
hs = {status = "Progressing", message = "Waiting for the operator"}
if obj.status == nil or obj.status.conditions == nil then
  return hs
end
if obj.status.observedGeneration == nil or obj.status.observedGeneration < obj.metadata.generation then
  hs.message = "The operator has not seen the latest spec yet"
  return hs
end
for _, c in ipairs(obj.status.conditions) do
  if c.type == "Stalled" and c.status == "True" then
    return {status = "Degraded", message = c.message}
  end
end
-- Converging, or a route migrating (as kstatus reads Reconciling).
for _, c in ipairs(obj.status.conditions) do
  if c.type == "Reconciling" and c.status == "True" then
    return {status = "Progressing", message = c.message}
  end
end
for _, c in ipairs(obj.status.conditions) do
  if c.type == "Ready" then
    if c.status == "True" then
      return {status = "Healthy", message = c.message}
    end
    hs.message = c.message
  end
end
return hs
