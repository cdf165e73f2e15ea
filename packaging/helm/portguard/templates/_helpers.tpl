{{/*
Names, labels and the policy, shared by the templates. The chart adds no
Helm-only labels (helm.sh/chart, managed-by) so that its default rendering is
exactly the manifests in packaging/kubernetes/, which kubectl applies.
*/}}

{{- define "portguard.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "portguard.selectorLabels" -}}
app.kubernetes.io/name: portguard
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "portguard.labels" -}}
{{ include "portguard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{/* Values that would grant permissions the policy does not use are refused. */}}
{{- define "portguard.validate" -}}
{{- $k := .Values.kubernetes -}}
{{- if not (has $k.onClaim (list "report" "reconfigure" "remove")) -}}
{{- fail (printf "kubernetes.onClaim %q: expected report, reconfigure or remove" $k.onClaim) -}}
{{- end -}}
{{- if and $k.removeCrds (ne $k.onClaim "remove") -}}
{{- fail "kubernetes.removeCrds needs kubernetes.onClaim: remove" -}}
{{- end -}}
{{- if and $k.remap (ne $k.onClaim "reconfigure") -}}
{{- fail "kubernetes.remap needs kubernetes.onClaim: reconfigure" -}}
{{- end -}}
{{- end -}}

{{/* The whole policy file: the values' `policy` and the tables the chart owns. */}}
{{- define "portguard.policy" -}}
{{- include "portguard.validate" . -}}
{{- $k := .Values.kubernetes -}}
{{ .Values.policy | trim }}

# Written by the chart from its values (metrics.*, kubernetes.*).
[metrics]
listen = "{{ if .Values.metrics.remote }}0.0.0.0{{ else }}127.0.0.1{{ end }}:{{ .Values.metrics.port }}"
allow_remote = {{ .Values.metrics.remote }}

[kubernetes]
on_claim = {{ $k.onClaim | quote }}
remove_crds = {{ $k.removeCrds }}
servicelb_namespace = {{ $k.servicelbNamespace | quote }}
{{- with $k.remap }}
{{- $pairs := list }}
{{- range $from, $to := . }}
{{- $pairs = append $pairs (printf "%s = %d" $from (int $to)) }}
{{- end }}
remap = { {{ join ", " $pairs }} }
{{- end }}
{{- end -}}

{{/*
ServiceLB's DaemonSet for Service kube-system/traefik is named
svclb-traefik-<first 8 characters of the Service's uid>: the name exists only
once the Service does, and changes whenever k3s re-creates Traefik, so no
resourceNames can name it (RBAC matches exact names, no prefixes, no labels,
and a list cannot be limited to a label selector). The rule therefore allows
get and delete of every DaemonSet in ServiceLB's namespace (kube-system
unless k3s runs with --servicelb-namespace: a namespace of its own narrows
this to ServiceLB's DaemonSets). What keeps the agent to the one DaemonSet is
its own code: it lists by ServiceLB's labels (svccontroller.k3s.cattle.io/
svcname=traefik, svcnamespace=kube-system), checks them again on each item,
and deletes only that DaemonSet, by name with a uid precondition
(guard/src/k8s/remove.rs; tested with other svclb DaemonSets present).
*/}}
{{- define "portguard.servicelbRule" -}}
# ServiceLB's DaemonSet for Traefik: found by label, read whole, deleted. Its
# name is not known in advance, so this cannot use resourceNames: it allows
# every DaemonSet in this namespace (see the chart's _helpers.tpl).
- apiGroups: ["apps"]
  resources: ["daemonsets"]
  verbs: ["list", "get", "delete"]
{{- end -}}
