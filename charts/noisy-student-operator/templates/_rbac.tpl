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
  verbs: [patch]
# Child jobs: TorchX's kubernetes scheduler creates Volcano Jobs; the
# operator re-attaches to them by name and watches them for phase changes.
# Running jobs of a deleted run are also garbage-collected through their
# ownerReference, so the operator needs no delete.
- apiGroups: [batch.volcano.sh]
  resources: [jobs]
  verbs: [create, get, list, watch]
# TorchX's describe() reads a Volcano Job through its status subresource, and
# its cancel (run deleted or suspended) sets the Job's phase to Aborted there.
- apiGroups: [batch.volcano.sh]
  resources: [jobs/status]
  verbs: [get, update]
# TorchX's describe() reads the first pod of each task of a running Job
# (`<job>-<task>-0`) for its IP address.
- apiGroups: [""]
  resources: [pods]
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
