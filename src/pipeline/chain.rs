//! Runs the handlers in order, each behind the same [`TraceWrapper`].

use crate::pipeline::{Handler, TraceWrapper, UploadContext};
use crate::wire::Reply;

/// An ordered list of handlers. Building a chain is the one place where every
/// handler gets wrapped, so tracing and error recording cannot be forgotten
/// for a new handler.
pub struct Chain {
    handlers: Vec<TraceWrapper<Box<dyn Handler>>>,
}

impl Chain {
    pub fn new(handlers: Vec<Box<dyn Handler>>) -> Self {
        Self {
            handlers: handlers.into_iter().map(TraceWrapper::new).collect(),
        }
    }

    /// Runs the chain until a handler responds or the last one is done.
    pub async fn run(&self, ctx: &mut UploadContext) -> Reply {
        for handler in &self.handlers {
            let outcome = handler.call(ctx).await;
            if let Some(error) = outcome.error {
                ctx.errors.push((handler.name(), error));
            }
            if let Some(reply) = outcome.responder {
                return reply;
            }
        }
        ctx.reply()
    }
}
