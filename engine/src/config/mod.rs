//! Every configuration-string parser in one place: sizes (`1.5G`),
//! `HOST[:PORT]`, CPU lists (`2-5,8`), shard lists (`0,1,auto`), and the `--export` spec's syntax. Each returns a one-line
//! reason on bad input; what the values mean is checked where they are used
//! (the control crate's factory for export specs).

pub mod ceph_key;
pub mod cpulist;
pub mod export_spec;
pub mod hostport;
pub mod shardlist;
pub mod size;
