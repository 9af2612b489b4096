//! piprov: provision Raspberry Pi SD cards for fleets managed by AWS Systems Manager.

pub mod image;
