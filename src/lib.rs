//! piprov: provision Raspberry Pi SD cards for fleets managed by AWS Systems Manager.

pub mod cli;
pub mod flash;
pub mod image;
pub mod inspect;
pub mod layout;
pub mod recipe;
pub mod stamp;
