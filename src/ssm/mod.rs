//! AWS Systems Manager through aws-sdk-ssm: hybrid activations, the cards'
//! own activations, the managed nodes they become, and ssh_config entries for them. Credentials and region come
//! from the standard chain (environment, profiles, SSO) unless given;
//! `AWS_ENDPOINT_URL[_SSM]` points the client elsewhere (the tests' local endpoint).

pub mod access_policy;
mod activations;
mod card;
mod fleet;
pub mod reconcile;
pub mod ssh_config;

pub use access_policy::SessionDocument;
pub use activations::*;
pub use card::{CardActivations, Issued};
pub use fleet::*;

use anyhow::{Result, anyhow, bail};
use aws_config::BehaviorVersion;
use aws_sdk_ssm::Client;
use aws_sdk_ssm::error::{ProvideErrorMetadata, SdkError};

#[derive(Debug, Clone, Default)]
pub struct Connection {
    pub profile: Option<String>,
    pub region: Option<String>,
}

pub async fn client(conn: &Connection) -> Result<Client> {
    Ok(Client::new(&sdk_config(conn, None).await?))
}

/// The SDK's configuration: the standard chain with `conn`'s overrides, a
/// region (`default_region` if none is set: IAM is global), and credentials
/// that resolve.
pub async fn sdk_config(
    conn: &Connection,
    default_region: Option<&'static str>,
) -> Result<aws_config::SdkConfig> {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(profile) = &conn.profile {
        loader = loader.profile_name(profile);
    }
    if let Some(region) = &conn.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    let mut config = loader.load().await;
    if let (None, Some(region)) = (config.region(), default_region) {
        config = config
            .into_builder()
            .region(aws_config::Region::new(region))
            .build();
    }
    match config.region() {
        None => {
            bail!("no AWS region: pass --region, set AWS_REGION, or name one in your AWS profile")
        }
        Some(region) if !crate::region::is_region_name(region.as_ref()) => bail!(
            "region {:?} is not an AWS region name (like eu-west-1): check --region, AWS_REGION or your profile",
            region.as_ref()
        ),
        Some(region) => crate::region::warn_if_unknown(region.as_ref()),
    }
    check_credentials(conn, &config).await?;
    Ok(config)
}

/// Whether `-v` asked for the SDK's own error chains.
static VERBOSE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn set_verbose(on: bool) {
    VERBOSE.store(on, std::sync::atomic::Ordering::Relaxed);
}

fn verbose() -> bool {
    VERBOSE.load(std::sync::atomic::Ordering::Relaxed)
}

/// Resolves credentials before the first call, so that a chain that finds none
/// says so, instead of the call failing as if SSM were unreachable (a network
/// that answers the instance-metadata address, as many proxies do, turns the
/// chain's last step into an HTTP error).
async fn check_credentials(conn: &Connection, config: &aws_config::SdkConfig) -> Result<()> {
    use aws_sdk_ssm::config::ProvideCredentials;
    let Some(provider) = config.credentials_provider() else {
        return Ok(());
    };
    if let Err(e) = provider.provide_credentials().await {
        let profile = conn
            .profile
            .clone()
            .or_else(|| std::env::var("AWS_PROFILE").ok())
            .unwrap_or_else(|| "default".into());
        let detail = if verbose() {
            format!(" ({})", aws_sdk_ssm::error::DisplayErrorContext(&e))
        } else {
            " (-v for the details)".into()
        };
        bail!(
            "no AWS credentials: tried the environment (AWS_ACCESS_KEY_ID), profile {profile:?} \
             (~/.aws/config and ~/.aws/credentials, with SSO and credential_process), web \
             identity, and the container and instance metadata endpoints; run `aws configure` \
             or `aws sso login`, or pass --profile{detail}"
        );
    }
    Ok(())
}

/// An endpoint set in the environment, which the SDK uses in place of AWS's.
fn endpoint_override() -> Option<(&'static str, String)> {
    ["AWS_ENDPOINT_URL_SSM", "AWS_ENDPOINT_URL"]
        .into_iter()
        .find_map(|v| Some((v, std::env::var(v).ok().filter(|u| !u.is_empty())?)))
}

/// One line that says what went wrong and what to do about it.
pub(crate) fn explain<E, R>(err: SdkError<E, R>, doing: &str) -> anyhow::Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let chain = format!("{}", aws_sdk_ssm::error::DisplayErrorContext(&err));
    let code = err.code().unwrap_or_default().to_string();
    let message = err.message().unwrap_or_default().to_string();
    let hint = match code.as_str() {
        "AccessDeniedException" if message.contains("iam:PassRole") => {
            "your identity may not pass that role to SSM: grant iam:PassRole on it".to_string()
        }
        "AccessDeniedException" => {
            "your identity lacks the SSM permission for this call".to_string()
        }
        "UnrecognizedClientException" | "InvalidClientTokenId" | "InvalidSignatureException" => {
            "the AWS credentials are not valid: check AWS_PROFILE or your access keys".to_string()
        }
        "ExpiredTokenException" | "ExpiredToken" => {
            "the AWS credentials have expired: renew them (e.g. `aws sso login`)".to_string()
        }
        "ThrottlingException" => {
            "SSM is throttling requests even after retries: try again later".to_string()
        }
        "InvalidActivationId" | "InvalidActivation" => {
            "no such activation in this account and region".to_string()
        }
        "ValidationException" => "SSM rejected a value".to_string(),
        _ if chain.contains("no credentials")
            || chain.contains("failed to load credentials")
            || chain.contains("CredentialsNotLoaded") =>
        {
            "no AWS credentials found: set AWS_PROFILE or AWS_ACCESS_KEY_ID, or run `aws sso login`"
                .to_string()
        }
        _ if matches!(
            err,
            SdkError::DispatchFailure(_) | SdkError::TimeoutError(_)
        ) =>
        {
            match endpoint_override() {
                Some((variable, url)) => {
                    format!("SSM could not be reached at {url} (from {variable}): is it up?")
                }
                None => "SSM could not be reached: check the network and the region".to_string(),
            }
        }
        _ => String::new(),
    };
    let detail = if !message.is_empty() {
        format!("{code}: {message}")
    } else if verbose() || hint.is_empty() {
        chain
    } else {
        "-v for the details".into()
    };
    if hint.is_empty() {
        anyhow!("{doing}: {detail}")
    } else {
        anyhow!("{doing}: {hint} ({detail})")
    }
}
