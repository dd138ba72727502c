{{/*
Least-privilege RBAC rules, in one place so a test can compare them with what
the operator's code uses. Every rule names what needs it.

"noisy-student-operator.rbac.namespacedRules": what reconciling runs in a
namespace needs; a ClusterRole (all namespaces) or a Role per watched
namespace.
*/}}
{{- define "noisy-student-operator.rbac.namespacedRules" -}}
# The runs: kopf lists/watches them, patches its finalizer and annotations
# (never spec), and the operator patches their status.
- apiGroups: [noisystudent.dev]
  resources: [noisystudentruns]
  verbs: [get, list, watch, patch]
- apiGroups: [noisystudent.dev]
  resources: [noisystudentruns/status]
  verbs: [get, patch]
# Child jobs: TorchX's kubernetes scheduler creates Volcano Jobs; the
# operator re-attaches to them by name, observes them, and deletes them on
# run deletion, suspend and retry.
- apiGroups: [batch.volcano.sh]
  resources: [jobs]
  verbs: [create, get, list, watch, patch, delete]
# TorchX's describe() reads a Volcano Job through its status subresource.
- apiGroups: [batch.volcano.sh]
  resources: [jobs/status]
  verbs: [get]
# Stage transitions and handler errors are posted as Events (kopf and the
# operator).
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end }}

{{/*
"noisy-student-operator.rbac.clusterRules": cluster-scoped reads kopf uses to
notice CustomResourceDefinitions appearing or changing at run time (without
them it warns and only rescans on restart).
*/}}
{{- define "noisy-student-operator.rbac.clusterRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- end }}
