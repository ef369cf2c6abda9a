//! Issue 8: what `deploy/` promises an operator, checked rather than only written. The
//! kustomizations are rendered by `kubectl kustomize` (what `kubectl apply -k` applies),
//! validated against the Kubernetes JSON schemas with `kubernetes-validate` (PyPI, installed by
//! the bootstrap), and the DaemonSet's least privilege, mounts, probes and rollout are asserted
//! field by field. The ConfigMap's config goes through the agent's own parser, and the real agent
//! runs and enforces in a lab namespace with only the capabilities the DaemonSet grants.

mod caps;
mod config;
mod crowdsec;
mod dashboard;
mod image;
mod kube;
mod manifests;
mod pod_spec;
