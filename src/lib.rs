//! piprov: provision Raspberry Pi SD cards for fleets managed by AWS Systems Manager.

pub mod account;
#[cfg(feature = "broker")]
pub mod broker;
pub mod cache;
pub mod cancel;
pub mod capture;
pub mod cli;
pub mod cmdline;
pub mod digest;
pub mod flash;
pub mod hex;
pub mod image;
pub mod inspect;
pub mod layout;
pub mod new_file;
pub mod progress;
pub mod recipe;
pub mod region;
pub mod runtime;
#[cfg(feature = "sql")]
pub mod sql;
pub mod ssm;
pub mod stamp;
#[cfg(feature = "station")]
pub mod station;
pub mod units;

/// Keeps panics raised inside fatfs quiet: `image::BootFs` turns them into errors
/// (fatfs panics on some corrupt cluster numbers). Any other panic is reported as
/// before.
pub fn contain_fatfs_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let in_fatfs = info
            .location()
            .is_some_and(|l| l.file().contains("/fatfs-"));
        if !in_fatfs {
            previous(info);
        }
    }));
}
