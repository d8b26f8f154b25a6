//! A batch's claiming transaction, one round trip shorter at each end than tokio-postgres's own
//! `Transaction`: its BEGIN goes out without waiting for a reply, so the claim sent right after it
//! travels with it, and its COMMIT goes out right behind its last statement (the delete of what the
//! batch applied): four round trips a batch rather than six. At low rates every change is a batch
//! of its own, and every round trip wakes a PostgreSQL backend and the listener's threads
//! (BENCHMARKS.md, "A batch at low rates").
//!
//! What makes this safe: tokio-postgres sends a request when its future is first polled, in the
//! order futures are first polled (its documented behaviour), and PostgreSQL runs one session's
//! requests in the order they arrive. A statement sent behind the BEGIN runs in the transaction. A
//! COMMIT sent behind a statement that fails ends the transaction without committing (PostgreSQL
//! answers the COMMIT of a failed transaction with a ROLLBACK), and the statement's error is what
//! the caller sees. A transaction dropped while open (an error on the way, a batch cancelled at
//! shutdown) sends ROLLBACK as it goes, as tokio-postgres's does, ahead of whatever the session is
//! asked next.

use std::future::Future;
use std::pin::{Pin, pin};
use std::task::Poll;

use deadpool_postgres::{ClientWrapper, StatementCache};
use futures_util::FutureExt;
use tokio_postgres::Client;
use tokio_postgres::types::{ToSql, Type};

use super::statements::Kept;
use crate::Error;

/// How a batch's transaction begins: at `READ COMMITTED` whatever the role's default, so that each
/// statement after the claim sees what was committed before it (behind a pooler a batch's loads run
/// in it, and tickets order renders only if every load's snapshot is newer than its ticket), and
/// no claim fails on a serialization conflict.
const BEGIN: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";

/// A reply not awaited yet.
type Reply<'c> = Pin<Box<dyn Future<Output = Result<(), tokio_postgres::Error>> + Send + 'c>>;

/// An open transaction on one of pgfresh's own sessions. Statements run on [`Pipelined::client`];
/// it ends with [`Pipelined::commit_with`], [`Pipelined::commit`] or [`Pipelined::rollback`], or
/// rolls back when dropped.
pub(crate) struct Pipelined<'c> {
    session: &'c ClientWrapper,
    /// The reply to the BEGIN, until it is read (with the first statement's, or before the
    /// transaction's next step).
    begun: Option<Reply<'c>>,
    open: bool,
}

impl<'c> Pipelined<'c> {
    /// Sends BEGIN, followed in the same message by `settings` (e.g. `SET LOCAL`s) when given, and
    /// returns without waiting for the reply: the transaction's first statement goes out right
    /// behind it, and the reply is to be read while that statement runs ([`Pipelined::begun`]).
    pub(crate) async fn begin(session: &'c ClientWrapper, settings: Option<&str>) -> Self {
        let sql = match settings {
            Some(settings) => format!("{BEGIN}; {settings}"),
            None => BEGIN.to_string(),
        };
        let mut begun: Reply<'c> = Box::pin(async move { session.batch_execute(&sql).await });
        // The first poll sends the request; its reply comes later.
        let begun = match futures_util::poll!(&mut begun) {
            Poll::Pending => begun,
            Poll::Ready(result) => Box::pin(std::future::ready(result)),
        };
        Pipelined {
            session,
            begun: Some(begun),
            open: true,
        }
    }

    /// The session, for the transaction's statements.
    pub(crate) fn client(&self) -> &'c Client {
        self.session
    }

    /// The session's kept statements.
    pub(crate) fn statement_cache(&self) -> &'c StatementCache {
        &self.session.statement_cache
    }

    /// Runs `sql` (one statement, its rows not wanted) and commits, the COMMIT sent right behind
    /// it: one round trip for both. With `kept`, the statement is prepared once per session as
    /// [`super::statements::Hot`] keeps them (prepared first, if it is not yet, so that the
    /// statement goes out in one request). An error from the statement is returned, and then
    /// nothing was committed.
    pub(crate) async fn commit_with(
        mut self,
        kept: Option<&Kept>,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<(), Error> {
        self.begun().await?;
        let (client, cache) = (self.client(), self.statement_cache());
        let types: Vec<Type> = params.iter().map(|(_, ty)| ty.clone()).collect();
        let kept = kept.filter(|kept| kept.allowed());
        let statement = match kept {
            Some(kept) => match kept.prepare(client, cache, sql, &types).await {
                Ok(statement) => Some(statement),
                Err(error) => {
                    kept.failed(cache, sql, &types, &error);
                    return Err(error.into());
                }
            },
            None => None,
        };
        let values: Vec<&(dyn ToSql + Sync)> = params.iter().map(|(value, _)| *value).collect();
        let run = async {
            match &statement {
                Some(statement) => client.execute(statement, &values).await,
                None => client.execute_typed(sql, params).await,
            }
        };
        let mut run = pin!(run);
        // The statement's request goes out on this first poll, as one message (a statement in
        // hand, or parsed with its run): nothing of it can come after the COMMIT. Done at once
        // with an error, it failed before it was sent (its parameters could not be encoded): no
        // COMMIT then, the transaction rolls back as it is dropped.
        let (ran, committed) = match futures_util::poll!(&mut run) {
            Poll::Ready(Err(error)) => (Err(error), Ok(())),
            sent => {
                // The COMMIT goes out in this same poll (no await comes before the join's first
                // poll): a cancelled batch cannot leave the transaction open without a ROLLBACK.
                self.open = false;
                let commit = client.batch_execute("COMMIT");
                match sent {
                    Poll::Ready(ran) => (ran, commit.await),
                    Poll::Pending => futures_util::future::join(run, commit).await,
                }
            }
        };
        if let (Err(error), Some(kept)) = (&ran, kept) {
            kept.failed(cache, sql, &types, error);
        }
        // The statement's error first: with it, the COMMIT rolled back.
        ran?;
        committed?;
        Ok(())
    }

    /// Commits, waiting for the reply.
    pub(crate) async fn commit(mut self) -> Result<(), Error> {
        self.begun().await?;
        self.open = false;
        self.session.batch_execute("COMMIT").await?;
        Ok(())
    }

    /// Rolls back without waiting for the reply (nothing was written that a reply could confirm),
    /// so its error, if any, is not seen; whatever the session is asked next waits behind it.
    pub(crate) fn rollback(self) {}

    /// Opens a savepoint named `name` (an SQL identifier): dropped without
    /// [`Savepoint::release`], the transaction rolls back to it.
    pub(crate) async fn savepoint(&mut self, name: &'static str) -> Result<Savepoint<'_>, Error> {
        self.begun().await?;
        self.session
            .batch_execute(&format!("SAVEPOINT {name}"))
            .await?;
        Ok(Savepoint {
            client: self.client(),
            name,
            ended: false,
        })
    }

    /// Reads the BEGIN's reply (once; later calls return at once): to be awaited together with
    /// the first statement (a reply not read holds up the session's replies behind it), and when
    /// it is an error, that error is why the statement failed.
    pub(crate) async fn begun(&mut self) -> Result<(), Error> {
        if let Some(begun) = self.begun.take() {
            begun.await?;
        }
        Ok(())
    }
}

impl Drop for Pipelined<'_> {
    fn drop(&mut self) {
        if self.open {
            send_unawaited(self.session, "ROLLBACK");
        }
    }
}

/// A savepoint in a [`Pipelined`] transaction.
pub(crate) struct Savepoint<'t> {
    client: &'t Client,
    name: &'static str,
    /// Released or rolled back to.
    ended: bool,
}

impl<'t> Savepoint<'t> {
    /// The session, for the statements under the savepoint.
    pub(crate) fn client(&self) -> &'t Client {
        self.client
    }

    /// Keeps what was done since the savepoint.
    pub(crate) async fn release(mut self) -> Result<(), Error> {
        self.ended = true;
        let sql = format!("RELEASE SAVEPOINT {}", self.name);
        self.client.batch_execute(&sql).await?;
        Ok(())
    }

    /// Undoes what was done since the savepoint, waiting for the reply.
    pub(crate) async fn rollback(mut self) -> Result<(), Error> {
        self.ended = true;
        let sql = format!("ROLLBACK TO SAVEPOINT {}", self.name);
        self.client.batch_execute(&sql).await?;
        Ok(())
    }
}

impl Drop for Savepoint<'_> {
    fn drop(&mut self) {
        if !self.ended {
            send_unawaited(self.client, &format!("ROLLBACK TO SAVEPOINT {}", self.name));
        }
    }
}

/// Sends `sql` without waiting for the reply: the request goes out on the future's first poll, and
/// the reply is dropped when it comes.
fn send_unawaited(client: &Client, sql: &str) {
    let _ = client.batch_execute(sql).now_or_never();
}
