//! Every ban, `GET /v1/bans` page by page. One page is fetched ahead on a thread, so the agent
//! builds page n+1 while the CLI writes page n out; JSON output passes each ban's object on as
//! the agent wrote it (checked to be JSON, not rebuilt), which halves the CLI's work on a
//! million-ban list.

use std::{io::Write, ops::Range, sync::mpsc};

use serde_json::value::RawValue;

use super::{Client, Result, client::query_value, output::JsonArray};
use crate::{api::BanJson, model::BanSource};

/// Rows per `GET /v1/bans` page: a 1M-ban list streams in 100 requests.
pub const PAGE: usize = 10_000;

/// One page as the agent sent it: the body and where each ban's object lies in it.
pub struct Page {
    body: String,
    items: Vec<Range<usize>>,
}

impl Page {
    fn read(c: &Client, body: Vec<u8>) -> Result<Self> {
        let body = String::from_utf8(body).map_err(|e| c.not_understood(e))?;
        let items = {
            let raws: Vec<&RawValue> =
                serde_json::from_str(&body).map_err(|e| c.not_understood(e))?;
            let base = body.as_ptr() as usize;
            raws.iter()
                .map(|r| {
                    let start = r.get().as_ptr() as usize - base;
                    start..start + r.get().len()
                })
                .collect::<Vec<_>>()
        };
        let page = Self { body, items };
        // One ban per page read whole: an agent of another version whose bans this CLI cannot
        // read fails here rather than passing odd objects on.
        if let Some(first) = page.raw().next() {
            serde_json::from_str::<BanJson>(first).map_err(|e| c.not_understood(e))?;
        }
        Ok(page)
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Each ban's JSON object, as the agent wrote it.
    pub fn raw(&self) -> impl Iterator<Item = &str> {
        self.items.iter().map(|r| &self.body[r.clone()])
    }

    pub fn bans(&self, c: &Client) -> Result<Vec<BanJson>> {
        self.raw()
            .map(|s| serde_json::from_str(s).map_err(|e| c.not_understood(e)))
            .collect()
    }
}

/// Every page (of `source`) in order, handed to `f`. A page shorter than [`PAGE`] is the last.
pub fn for_each_raw_page(
    c: &Client,
    source: Option<BanSource>,
    mut f: impl FnMut(&Page) -> Result<()>,
) -> Result<()> {
    std::thread::scope(|s| {
        // Inside the scope: on an early return `rx` is dropped before the scope waits for the
        // fetcher, whose blocked send then fails and lets it end.
        let (tx, rx) = mpsc::sync_channel::<Result<Page>>(1);
        s.spawn(move || {
            let mut offset = 0;
            loop {
                let mut path = format!("/v1/bans?offset={offset}&limit={PAGE}");
                if let Some(s) = source {
                    path.push_str(&format!("&source={}", query_value(s.as_str())));
                }
                let page = c.get_bytes(&path).and_then(|b| Page::read(c, b));
                let full = page.as_ref().is_ok_and(|p| p.len() == PAGE);
                // A closed channel: the writer failed and returned; stop fetching.
                if tx.send(page).is_err() || !full {
                    return;
                }
                offset += PAGE;
            }
        });
        rx.iter().try_for_each(|page| f(&page?))
    })
}

/// Every ban (of `source`), page by page, read whole.
pub fn for_each_page(
    c: &Client,
    source: Option<BanSource>,
    mut f: impl FnMut(&[BanJson]) -> Result<()>,
) -> Result<()> {
    for_each_raw_page(c, source, |page| f(&page.bans(c)?))
}

/// Every ban (of `source`) as one JSON array in the `ban list` shape, page by page. Nothing is
/// written before the first page arrived: a failure prints no stray `[`.
pub fn json_pages(c: &Client, source: Option<BanSource>, out: &mut impl Write) -> Result<()> {
    let mut arr = None;
    for_each_raw_page(c, source, |page| {
        let arr = match &mut arr {
            Some(a) => a,
            None => arr.insert(JsonArray::start(out)?),
        };
        for b in page.raw() {
            arr.push_raw(out, b)?;
        }
        Ok(())
    })?;
    if let Some(arr) = arr {
        arr.end(out)?;
    }
    Ok(())
}
