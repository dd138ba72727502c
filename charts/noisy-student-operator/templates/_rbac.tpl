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
# operator re-attaches to them by name, reads each with one GET per pass,
# watches them for phase changes, and cancels one (run suspended, stage no
# longer in the spec, run deleted) by deleting it with foreground
# propagation, which it confirms when the Job is gone.
- apiGroups: [batch.volcano.sh]
  resources: [jobs]
  verbs: [create, get, list, watch, delete]
# A failed Job's message names the failed pod, its exit code and reason, and
# a waiting Job's says why it waits: the Job's pods are listed (by Volcano's
# job-name label) when it fails or is Pending.
- apiGroups: [""]
  resources: [pods]
  verbs: [list]
# A waiting Job whose pods do not say why (Volcano has not created them)
# quotes Volcano's Unschedulable condition from the Job's PodGroup, or the
# Events Volcano posted about the PodGroup (listed by its name).
- apiGroups: [scheduling.volcano.sh]
  resources: [podgroups]
  verbs: [get]
# Stage transitions and handler errors are posted as Events (kopf and the
# operator); Volcano's Events about a waiting Job's PodGroup are listed.
- apiGroups: [""]
  resources: [events]
  verbs: [create, list]
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
