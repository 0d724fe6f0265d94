//! stream-credits: credit reservation, token counting and settlement for
//! streaming LLM chats, fed by RabbitMQ and kept in PostgreSQL.
//!
//! A chat backend publishes `stream.started`, `chunk.emitted` and
//! `stream.ended` for each chat. The worker holds credits up front,
//! counts the tokens of every chunk, and settles the hold at the end:
//! charge what was used, release the rest, every balance change a ledger
//! row, every message applied at most once.
//!
//! Modules, in the order a message meets them:
//!
//! - [`settings`]: layered settings (defaults, TOML, environment) and
//!   their validation.
//! - [`topology`]: exchange and queue names, and their declaration.
//! - [`broker`]: RabbitMQ connection and confirmed publishing.
//! - [`messages`]: wire types and the validating decoder.
//! - [`tokens`]: tiktoken counting of prompts and chunks.
//! - [`pricing`]: model prices and the cost of usage.
//! - [`settlement`]: the arithmetic of settling a hold.
//! - [`holds`]: sizing a hold from history, growing it while its stream
//!   runs, and the retry estimate of a user at the stream limit.
//! - [`ledger`]: applying messages to PostgreSQL, with the outbox of
//!   replies and events.
//! - [`worker`]: the consumer loop, batches, retries, dead letters and the
//!   expiry sweep.
//! - [`retention`]: deleting the records of counted chunks whose streams
//!   are settled.
//! - [`accounts`]: read-only account views with their open holds.
//! - [`invariants`]: whole-database checks of the ledger's invariants.
//! - [`db`]: connection pool and embedded migrations.
//! - [`replay`]: parsers of recorded provider streams and conversations.
//! - [`producer`]: the producer side, publishing chats and awaiting their
//!   grants and settlements (used by `replay` and `demo`).
//! - [`dlq`]: listing, showing, replaying and purging dead letters.
//! - [`report`]: the read-only reconciliation report of the ledger.
//! - [`bench`]: the benchmark against the local broker and database.
//! - [`hold_sizing`]: how closely holds fit charges on the OpenAssistant
//!   replay, with and without sizing from history.
//! - [`demo`]: the end-to-end demonstration on real recorded input.
//! - [`cli`]: the command line.
//! - [`http`]: `/metrics`, `/healthz` and `/readyz`.
//! - [`telemetry`]: logging setup.

pub mod accounts;
pub mod bench;
pub mod broker;
pub mod cli;
pub mod db;
pub mod dlq;
pub mod hold_sizing;
pub mod holds;
pub mod http;
pub mod demo;
pub mod invariants;
pub mod ledger;
pub mod messages;
pub mod pricing;
pub mod producer;
pub mod replay;
pub mod report;
pub mod retention;
pub mod settings;
pub mod settlement;
pub mod telemetry;
pub mod tokens;
pub mod topology;
pub mod worker;
