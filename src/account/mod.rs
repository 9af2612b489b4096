//! The AWS account before any card: the IAM service role hybrid nodes assume
//! (`piprov setup role`). IAM is reached with the same SDK stack, credential
//! chain and TLS as SSM (`AWS_ENDPOINT_URL[_IAM]` points it elsewhere, as the
//! tests do).

pub mod role;

use anyhow::Result;

use crate::ssm::{Connection, sdk_config};

/// IAM is global: without a region, us-east-1 signs the requests.
pub async fn iam_client(conn: &Connection) -> Result<aws_sdk_iam::Client> {
    Ok(aws_sdk_iam::Client::new(
        &sdk_config(conn, Some("us-east-1")).await?,
    ))
}
