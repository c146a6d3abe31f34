//! A chain of elements hanging off a `tee` of the running pipeline, added
//! and removed while the rest keeps playing.
//!
//! The encoders (on the raw tee), the JPEG fallback and every viewer (on an
//! encoder's tee) are branches; `encoder`, `jpeg` and `viewer` build them.

use std::sync::mpsc;
use std::time::Duration;

use gstreamer as gst;
use gstreamer::prelude::*;

/// How long [`Branch::detach`] waits for the tee pad to go idle before it
/// unlinks anyway (the branch queues are leaky, so this is a safety net).
const IDLE_WAIT: Duration = Duration::from_secs(2);

/// Why a branch could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BranchError {
    /// An element could not be made (plugin missing?) or configured.
    #[error("cannot make element {factory}: {reason}")]
    Element {
        /// The factory name.
        factory: String,
        /// What went wrong.
        reason: String,
    },
    /// Elements could not be added, linked or started.
    #[error("cannot link the {0} branch")]
    Link(String),
}

/// Makes an element, naming the factory in the error.
pub fn make(factory: &str, name: &str) -> Result<gst::Element, BranchError> {
    gst::ElementFactory::make(factory)
        .name(name)
        .build()
        .map_err(|e| BranchError::Element {
            factory: factory.into(),
            reason: e.to_string(),
        })
}

/// A leaky queue holding at most `buffers` buffers: latency matters more
/// than completeness, and a stuck consumer must never block the producer.
pub fn leaky_queue(name: &str, buffers: u32) -> Result<gst::Element, BranchError> {
    let queue = make("queue", name)?;
    queue.set_property("max-size-buffers", buffers);
    queue.set_property("max-size-bytes", 0u32);
    queue.set_property("max-size-time", 0u64);
    queue.set_property_from_str("leaky", "downstream");
    Ok(queue)
}

/// A tee that keeps flowing with no (or unlinked) branches.
pub fn tee(name: &str) -> Result<gst::Element, BranchError> {
    let tee = make("tee", name)?;
    tee.set_property("allow-not-linked", true);
    Ok(tee)
}

/// Elements linked in a chain behind a request pad of a tee.
#[derive(Debug)]
pub struct Branch {
    pipeline: gst::Pipeline,
    tee: gst::Element,
    tee_pad: gst::Pad,
    elements: Vec<gst::Element>,
    label: String,
}

impl Branch {
    /// Adds `elements` to the pipeline, links them in order (the last one to
    /// `tail` when given), starts them and only then links the first one to
    /// a new pad of `tee`, so no buffer reaches an element that is not ready.
    pub fn attach(
        pipeline: &gst::Pipeline,
        tee: &gst::Element,
        elements: Vec<gst::Element>,
        tail: Option<&gst::Pad>,
        label: &str,
    ) -> Result<Self, BranchError> {
        let fail = || BranchError::Link(label.to_owned());
        let first = elements.first().ok_or_else(fail)?.clone();
        pipeline.add_many(&elements).map_err(|_| fail())?;
        let linked = gst::Element::link_many(&elements).is_ok()
            && tail.is_none_or(|pad| link_tail(&elements, pad));
        let started = linked
            && elements
                .iter()
                .rev()
                .all(|e| e.sync_state_with_parent().is_ok());
        let Some(tee_pad) = tee.request_pad_simple("src_%u") else {
            discard(pipeline, &elements);
            return Err(fail());
        };
        let branch = Self {
            pipeline: pipeline.clone(),
            tee: tee.clone(),
            tee_pad,
            elements,
            label: label.to_owned(),
        };
        let sink = first.static_pad("sink");
        match sink {
            Some(sink) if started && branch.tee_pad.link(&sink).is_ok() => Ok(branch),
            _ => {
                branch.detach();
                Err(fail())
            }
        }
    }

    /// The element right behind the tee.
    pub fn first(&self) -> &gst::Element {
        &self.elements[0]
    }

    /// Unlinks the branch once its tee pad is idle, releases the pad, and
    /// stops and removes the elements; the tee keeps feeding the others.
    pub fn detach(self) {
        let (tx, rx) = mpsc::sync_channel(1);
        let sink = self.first().static_pad("sink");
        self.tee_pad
            .add_probe(gst::PadProbeType::IDLE, move |pad, _| {
                if let Some(sink) = &sink {
                    let _ = pad.unlink(sink);
                }
                let _ = tx.try_send(());
                gst::PadProbeReturn::Remove
            });
        if rx.recv_timeout(IDLE_WAIT).is_err() {
            tracing::warn!(branch = %self.label, "tee pad never went idle, unlinking anyway");
            if let Some(sink) = self.first().static_pad("sink") {
                let _ = self.tee_pad.unlink(&sink);
            }
        }
        self.tee.release_request_pad(&self.tee_pad);
        discard(&self.pipeline, &self.elements);
        tracing::debug!(branch = %self.label, "branch removed");
    }
}

fn link_tail(elements: &[gst::Element], tail: &gst::Pad) -> bool {
    let src = elements.last().and_then(|e| e.static_pad("src"));
    src.is_some_and(|src| src.link(tail).is_ok())
}

/// Stops elements (upstream first, so nothing pushes into a stopped one)
/// and takes them out of the pipeline.
fn discard(pipeline: &gst::Pipeline, elements: &[gst::Element]) {
    for element in elements {
        let _ = element.set_state(gst::State::Null);
        let _ = pipeline.remove(element);
    }
}
