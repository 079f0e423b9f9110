//! nbd-runner's control plane. The wire messages, registry and persistence
//! arrive with the control-plane issue; the data plane does not depend on it.
