//! AWS Systems Manager through aws-sdk-ssm: hybrid activations, the cards'
//! own activations, the managed nodes they become, and ssh_config entries for them. Credentials and region come
//! from the standard chain (environment, profiles, SSO) unless given;
//! `AWS_ENDPOINT_URL[_SSM]` points the client elsewhere (the tests' local endpoint).

mod activations;
mod card;
mod fleet;
pub mod ssh_config;

pub use activations::*;
pub use card::CardActivations;
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
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(profile) = &conn.profile {
        loader = loader.profile_name(profile);
    }
    if let Some(region) = &conn.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    let config = loader.load().await;
    match config.region() {
        None => bail!(
            "no AWS region: pass --region, set AWS_REGION, or set one in the recipe or your profile"
        ),
        Some(region) if !crate::recipe::is_region_name(region.as_ref()) => bail!(
            "region {:?} is not an AWS region name (like eu-west-1): check --region, AWS_REGION or your profile",
            region.as_ref()
        ),
        Some(_) => {}
    }
    Ok(Client::new(&config))
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
            "SSM could not be reached: check the network and the region".to_string()
        }
        _ => String::new(),
    };
    let detail = if message.is_empty() {
        chain
    } else {
        format!("{code}: {message}")
    };
    if hint.is_empty() {
        anyhow!("{doing}: {detail}")
    } else {
        anyhow!("{doing}: {hint} ({detail})")
    }
}
