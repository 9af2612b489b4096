//! Activations made but never recorded: a broker killed between making one and
//! recording it leaves one that no card got. Each issue is announced in the
//! database (pending_issues, with a deadline on the database's clock) before its
//! activation is made, and may be recorded only before that deadline. So an
//! activation tagged with this broker_id that the database does not know is
//! deleted unless its issue is still within its deadline: a live broker (this
//! one or another sharing the database) may yet record it and hand it out.
//! Runs at start and then every lease; each lease also drops audit lines past
//! `audit_keep` or `audit_max_rows`.

use anyhow::Result;

use super::api::Broker;
use crate::ssm::{self, TAG_BROKER, TAG_ISSUE};

impl Broker {
    /// Deletes the activations no live issue can still record; returns how many.
    pub async fn forget_unrecorded(&self) -> Result<usize> {
        // SSM first, the database second: an activation recorded in between is
        // known by then, and one whose deadline passed in between can no
        // longer be recorded.
        let listed = ssm::list_activations(&self.ssm).await?;
        let books = self.store.bookkeeping().await?;
        let tag = |a: &ssm::ActivationInfo, key: &str| {
            a.tags
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        let mut deleted = 0;
        for a in &listed {
            if tag(a, TAG_BROKER).as_deref() != Some(&self.config.config.broker_id)
                || books.known.contains(&a.id)
            {
                continue;
            }
            let issue = tag(a, TAG_ISSUE);
            if let Some(issue) = &issue {
                if books.pending.get(issue) == Some(&true) {
                    continue;
                }
            }
            // Another broker may be deleting the same one: its failure is
            // logged and the rest go on.
            match ssm::delete_activation(&self.ssm, &a.id).await {
                Ok(()) => deleted += 1,
                Err(e) => tracing::warn!("deleting unrecorded activation {}: {e:#}", a.id),
            }
        }
        self.store.drop_late_issues().await?;
        Ok(deleted)
    }

    /// Every lease, for as long as the broker runs: a broker killed part-way
    /// leaves its in-flight activations to the others.
    pub async fn clean_up_periodically(self: std::sync::Arc<Self>) {
        let every = std::time::Duration::from_secs(self.lease_secs().max(5) as u64);
        loop {
            tokio::time::sleep(every).await;
            self.tidy().await;
        }
    }

    /// At start and every lease: unrecorded activations go, and audit lines
    /// past `audit_keep` or `audit_max_rows`. Failures are logged; the
    /// broker goes on serving.
    pub async fn tidy(&self) {
        match self.forget_unrecorded().await {
            Ok(0) => {}
            Ok(n) => tracing::info!("deleted {n} activations made but never recorded"),
            Err(e) => tracing::warn!("looking for unrecorded activations: {e:#}"),
        }
        let before = super::store::now() - self.config.audit_keep.as_secs() as i64;
        match self
            .store
            .prune_audit(before, self.config.config.audit_max_rows)
            .await
        {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!("dropped {n} audit lines past audit_keep or audit_max_rows")
            }
            Err(e) => tracing::warn!("pruning the audit log: {e:#}"),
        }
    }
}
