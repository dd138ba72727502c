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
# Checked by admission, never requested: each Job's ownerReference to its run
# sets blockOwnerDeletion, and OwnerReferencesPermissionEnforcement (OpenShift,
# hardened clusters) then requires update on the owner's finalizers, or every
# Job create is Forbidden.
- apiGroups: [noisystudent.dev]
  resources: [noisystudentruns/finalizers]
  verbs: [update]
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


{{/*
"noisy-student-operator.rbac.viewRules" and "...editRules": what users of runs
get through the built-in `view`, `edit` and `admin` ClusterRoles (aggregated).
Creating a run amounts to running its image in the namespace with the
namespace's quota, so `edit` gets it as it gets Jobs and Pods.
*/}}
{{- define "noisy-student-operator.rbac.viewRules" -}}
- apiGroups: [noisystudent.dev]
  resources: [noisystudentruns, noisystudentruns/status]
  verbs: [get, list, watch]
{{- end }}

{{- define "noisy-student-operator.rbac.editRules" -}}
- apiGroups: [noisystudent.dev]
  resources: [noisystudentruns]
  verbs: [create, update, patch, delete, deletecollection]
{{- end }}
