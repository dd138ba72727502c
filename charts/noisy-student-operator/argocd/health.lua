-- Argo CD health check for noisystudent.dev/NoisyStudentRun.
--
-- Install it in argocd-cm under the key
--   resource.customizations.health.noisystudent.dev_NoisyStudentRun
-- (docs/install.md shows the full ConfigMap snippet).
--
-- A run is a batch workload, so it maps like a Kubernetes Job:
--   Healthy     the run Succeeded
--   Degraded    the run Failed (retries exhausted or invalid spec)
--   Suspended   spec.suspend is set and the operator has stopped the run
--   Progressing everything else: not yet observed, spec change not yet
--               observed (status.observedGeneration < metadata.generation),
--               or stages still running
local hs = {}

local function find_condition(conditions, wanted)
  if conditions == nil then
    return nil
  end
  for _, condition in ipairs(conditions) do
    if condition.type == wanted then
      return condition
    end
  end
  return nil
end

local function is_true(condition)
  return condition ~= nil and condition.status == "True"
end

local function describe(condition, fallback)
  if condition ~= nil and condition.message ~= nil and condition.message ~= "" then
    return condition.message
  end
  if condition ~= nil and condition.reason ~= nil and condition.reason ~= "" then
    return condition.reason
  end
  return fallback
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to pick up the run"
  return hs
end

local generation = obj.metadata.generation
local observed = status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local conditions = status.conditions
-- First match wins: a failure outranks success and suspension.
local verdicts = {
  {condition = "Failed", health = "Degraded", fallback = "Run failed"},
  {condition = "Succeeded", health = "Healthy", fallback = "Run succeeded"},
  {condition = "Suspended", health = "Suspended", fallback = "Run suspended"},
}
for _, verdict in ipairs(verdicts) do
  local condition = find_condition(conditions, verdict.condition)
  if is_true(condition) then
    hs.status = verdict.health
    hs.message = describe(condition, verdict.fallback)
    return hs
  end
end

local progressing = find_condition(conditions, "Progressing")
hs.status = "Progressing"
if status.stage ~= nil then
  hs.message = describe(progressing, "Stage " .. status.stage)
else
  hs.message = describe(progressing, "Run in progress")
end
return hs
