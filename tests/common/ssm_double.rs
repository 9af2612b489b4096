//! A fast SSM double for the broker load test, in this process on threads of
//! its own (named `ssm-double`, so their CPU time can be read apart): the JSON
//! 1.1 protocol for what a broker calls (CreateActivation, DescribeActivations,
//! DeleteActivation, DescribeInstanceInformation by InstanceIds,
//! ListTagsForResource, AddTagsToResource), with the same rules as
//! tests/support/ssm_stub.py (registration limit, expiry, tags carried from
//! the activation to the node). The agent's RegisterManagedInstance is a call
//! on the double itself: the load's simulated cards are in this process too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

#[derive(Clone)]
struct Activation {
    id: String,
    code: String,
    tags: Vec<Value>,
    limit: u64,
    registrations: u64,
    expires: f64,
    created: f64,
    default_name: String,
}

struct Node {
    id: String,
    activation_id: String,
    tags: Vec<Value>,
    registered: f64,
}

#[derive(Default)]
struct State {
    activations: HashMap<String, Activation>,
    nodes: HashMap<String, Node>,
    next: u64,
}

/// The agent's side of the double, for the load's cards on other threads.
#[derive(Clone)]
pub struct Registrar(Arc<Mutex<State>>);

impl Registrar {
    /// The node's id, or the error's type.
    pub fn register(&self, activation_id: &str, code: &str) -> Result<String, String> {
        self.0.lock().unwrap().register(activation_id, code)
    }
}

pub struct SsmDouble {
    pub url: String,
    state: Arc<Mutex<State>>,
    runtime: Option<tokio::runtime::Runtime>,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn error(kind: &str, message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        [("content-type", "application/x-amz-json-1.1")],
        json!({"__type": kind, "message": message}).to_string(),
    )
        .into_response()
}

fn ok(value: Value) -> Response {
    (
        [("content-type", "application/x-amz-json-1.1")],
        value.to_string(),
    )
        .into_response()
}

/// A page of `items` from the request's NextToken, `size` at most.
fn page<T: Clone>(items: &[T], body: &Value, size: usize) -> (Vec<T>, Option<String>) {
    let start: usize = body["NextToken"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let end = (start + size).min(items.len());
    let next = (end < items.len()).then(|| end.to_string());
    (items[start.min(end)..end].to_vec(), next)
}

impl State {
    fn create(&mut self, body: &Value) -> Response {
        if body["IamRole"].as_str().unwrap_or("").is_empty() {
            return error("ValidationException", "iamRole must not be null");
        }
        let limit = body["RegistrationLimit"].as_u64().unwrap_or(1);
        if !(1..=1000).contains(&limit) {
            return error(
                "ValidationException",
                "RegistrationLimit must be between 1 and 1000",
            );
        }
        let now = now();
        let expires = body["ExpirationDate"].as_f64().unwrap_or(now + 86_400.0);
        if expires <= now {
            return error(
                "ValidationException",
                "ExpirationDate must be in the future",
            );
        }
        self.next += 1;
        let id = format!("{:08x}-0000-4000-8000-{:012x}", self.next, self.next);
        let code = format!("code{:016x}", self.next.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        self.activations.insert(
            id.clone(),
            Activation {
                id: id.clone(),
                code: code.clone(),
                tags: body["Tags"].as_array().cloned().unwrap_or_default(),
                limit,
                registrations: 0,
                expires,
                created: now,
                default_name: body["DefaultInstanceName"].as_str().unwrap_or("").into(),
            },
        );
        ok(json!({"ActivationId": id, "ActivationCode": code}))
    }

    fn describe_activations(&self, body: &Value) -> Response {
        let mut all: Vec<&Activation> = self.activations.values().collect();
        all.sort_by(|a, b| a.created.total_cmp(&b.created).then(a.id.cmp(&b.id)));
        let size = body["MaxResults"].as_u64().unwrap_or(50) as usize;
        let (items, next) = page(&all, body, size.max(1));
        let list: Vec<Value> = items
            .iter()
            .map(|a| {
                json!({"ActivationId": a.id, "IamRole": "SSMServiceRole",
                    "RegistrationLimit": a.limit, "RegistrationsCount": a.registrations,
                    "ExpirationDate": a.expires, "Expired": a.expires < now(),
                    "CreatedDate": a.created, "DefaultInstanceName": a.default_name,
                    "Tags": a.tags})
            })
            .collect();
        let mut reply = json!({"ActivationList": list});
        if let Some(next) = next {
            reply["NextToken"] = next.into();
        }
        ok(reply)
    }

    fn delete_activation(&mut self, body: &Value) -> Response {
        let id = body["ActivationId"].as_str().unwrap_or("");
        match self.activations.remove(id) {
            Some(_) => ok(json!({})),
            None => error(
                "InvalidActivationId",
                &format!("The activation ID {id} is not valid."),
            ),
        }
    }

    fn register(&mut self, activation_id: &str, code: &str) -> Result<String, String> {
        let Some(a) = self.activations.get_mut(activation_id) else {
            return Err("InvalidActivation".into());
        };
        if a.code != code {
            return Err("InvalidActivation".into());
        }
        if a.expires < now() {
            return Err("ActivationExpired".into());
        }
        if a.registrations >= a.limit {
            return Err("RegistrationLimitExceeded".into());
        }
        a.registrations += 1;
        self.next += 1;
        let id = format!("mi-{:017x}", self.next);
        let tags = a.tags.clone();
        self.nodes.insert(
            id.clone(),
            Node {
                id: id.clone(),
                activation_id: activation_id.into(),
                tags,
                registered: now(),
            },
        );
        Ok(id)
    }

    fn describe_nodes(&self, body: &Value) -> Response {
        let mut wanted: Option<Vec<&str>> = None;
        for filter in body["Filters"].as_array().into_iter().flatten() {
            let values: Vec<&str> = filter["Values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            match filter["Key"].as_str() {
                Some("InstanceIds") => wanted = Some(values),
                Some("ResourceType") => {}
                other => {
                    return error(
                        "InvalidInstanceInformationFilterValue",
                        &format!("filter {other:?} is not kept here"),
                    );
                }
            }
        }
        let mut found: Vec<&Node> = match &wanted {
            Some(ids) => ids.iter().filter_map(|id| self.nodes.get(*id)).collect(),
            None => self.nodes.values().collect(),
        };
        found.sort_by(|a, b| a.registered.total_cmp(&b.registered).then(a.id.cmp(&b.id)));
        let size = body["MaxResults"].as_u64().unwrap_or(50) as usize;
        let (items, next) = page(&found, body, size.max(1));
        let list: Vec<Value> = items
            .iter()
            .map(|n| {
                json!({"InstanceId": n.id, "ActivationId": n.activation_id,
                    "PingStatus": "Online", "ResourceType": "ManagedInstance",
                    "RegistrationDate": n.registered, "LastPingDateTime": n.registered})
            })
            .collect();
        let mut reply = json!({"InstanceInformationList": list});
        if let Some(next) = next {
            reply["NextToken"] = next.into();
        }
        ok(reply)
    }

    /// The node a tagging call names, or the error's (type, message).
    fn node_mut(&mut self, body: &Value) -> Result<&mut Node, (&'static str, String)> {
        if body["ResourceType"] != "ManagedInstance" {
            return Err((
                "InvalidResourceType",
                "only ManagedInstance is kept here".into(),
            ));
        }
        let id = body["ResourceId"].as_str().unwrap_or("");
        self.nodes
            .get_mut(id)
            .ok_or_else(|| ("InvalidResourceId", format!("{id} is not valid")))
    }

    fn handle(&mut self, target: &str, body: &Value) -> Response {
        match target {
            "AmazonSSM.CreateActivation" => self.create(body),
            "AmazonSSM.DescribeActivations" => self.describe_activations(body),
            "AmazonSSM.DeleteActivation" => self.delete_activation(body),
            "AmazonSSM.DescribeInstanceInformation" => self.describe_nodes(body),
            "AmazonSSM.ListTagsForResource" => match self.node_mut(body) {
                Ok(node) => ok(json!({"TagList": node.tags})),
                Err((kind, message)) => error(kind, &message),
            },
            "AmazonSSM.AddTagsToResource" => match self.node_mut(body) {
                Ok(node) => {
                    for tag in body["Tags"].as_array().into_iter().flatten() {
                        node.tags.retain(|t| t["Key"] != tag["Key"]);
                        node.tags.push(tag.clone());
                    }
                    ok(json!({}))
                }
                Err((kind, message)) => error(kind, &message),
            },
            other => error(
                "UnknownOperationException",
                &format!("{other} is not kept here"),
            ),
        }
    }
}

impl SsmDouble {
    pub fn start(threads: usize) -> SsmDouble {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("ssm-double")
            .enable_all()
            .build()
            .unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shared = state.clone();
        let app = axum::Router::new().route(
            "/",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let state = shared.clone();
                async move {
                    let target = headers
                        .get("x-amz-target")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    state.lock().unwrap().handle(&target, &body)
                }
            }),
        );
        runtime.spawn(async move { axum::serve(listener, app).await });
        SsmDouble {
            url,
            state,
            runtime: Some(runtime),
        }
    }

    /// What a card's agent registers through (`amazon-ssm-agent -register`).
    pub fn registrar(&self) -> Registrar {
        Registrar(self.state.clone())
    }

    /// Environment for piprov processes pointed at the double (no host AWS setup).
    pub fn env(&self, home: &std::path::Path) -> Vec<(String, String)> {
        super::ssm_endpoint::aws_env(home, &self.url)
    }

    fn serial(tags: &[Value]) -> String {
        tags.iter()
            .find(|t| t["Key"] == "piprov:serial")
            .and_then(|t| t["Value"].as_str())
            .unwrap_or("")
            .to_string()
    }

    /// Every activation: (id, its serial tag, registrations made with it).
    pub fn activations(&self) -> Vec<(String, String, u64)> {
        let state = self.state.lock().unwrap();
        state
            .activations
            .values()
            .map(|a| (a.id.clone(), Self::serial(&a.tags), a.registrations))
            .collect()
    }

    /// Every node: (id, its serial tag, the activation it was made with).
    pub fn nodes(&self) -> Vec<(String, String, String)> {
        let state = self.state.lock().unwrap();
        state
            .nodes
            .values()
            .map(|n| (n.id.clone(), Self::serial(&n.tags), n.activation_id.clone()))
            .collect()
    }
}

impl Drop for SsmDouble {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
