//! The bench's page: one tile per card, its state pushed as it changes
//! (Server-Sent Events), and the same state as JSON. Read-only: nothing on
//! the page can start, stop or write a card.

use std::convert::Infallible;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::Router;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Json};
use axum::routing::get;
use futures_util::Stream;

use super::Board;

const PAGE: &str = include_str!("page.html");

pub async fn serve(listener: std::net::TcpListener, board: Arc<Board>) -> Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let app = Router::new()
        .route(
            "/",
            get({
                let board = board.clone();
                move || async move { Html(page(&board)) }
            }),
        )
        .route(
            "/api/cards",
            get({
                let board = board.clone();
                move || async move { Json(board.cards()).into_response() }
            }),
        )
        .route(
            "/api/events",
            get({
                let board = board.clone();
                move || async move { Sse::new(feed(&board)).keep_alive(KeepAlive::default()) }
            }),
        );
    axum::serve(listener, app)
        .await
        .context("serving the bench's page")
}

/// The page with the cards so far in it, so that it shows them as soon as
/// it is parsed. `<` is escaped: no text from a card can close the script.
fn page(board: &Board) -> String {
    let cards = serde_json::to_string(&board.cards())
        .unwrap_or_else(|_| "[]".into())
        .replace('<', "\\u003c");
    PAGE.replace("/*CARDS*/", &cards)
}

/// Every card's change from now on, one event each.
fn feed(board: &Board) -> impl Stream<Item = Result<Event, Infallible>> + use<> {
    let mut changes = board.subscribe();
    async_stream(move |tx| async move {
        loop {
            match changes.recv().await {
                Ok(line) => {
                    if tx.send(Ok(Event::default().data(line))).await.is_err() {
                        return;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    })
}

/// A stream fed by a task, without another crate for it.
fn async_stream<F, Fut>(body: F) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Event, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(body(tx));
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
