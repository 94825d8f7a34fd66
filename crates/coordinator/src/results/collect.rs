//! Reading a step's results from where they are: its output (already in
//! the coordinator) and the result files it names, fetched from the
//! machine one by one. Every fetch is bounded; a file that cannot be read
//! becomes a sentence in [`Results::problems`], never a failed build.

use std::io::Read;
use std::time::Duration;

use buildlet::client::{Client, LsOptions};
use buildlet::proto::EntryKind;

use super::{MAX_FILE, MAX_FILES, ResultFiles, Results, from_output, glob_base, glob_match};
use crate::bounded::CappedBuffer;
use crate::secrets::Mask;

/// The longest all result files of one step may take to fetch.
const FETCH_LIMIT: Duration = Duration::from_secs(60);

/// Output up to this long is parsed on the async thread (microseconds).
const PARSE_HERE: usize = 16 << 10;

/// The results of a step that ran in `dir` (relative to the work dir) and
/// printed `log` (already masked); `mask` hides the farm's secrets in the
/// result files, whose failure output is shown on pages.
pub async fn collect(
    client: &Client,
    dir: &str,
    files: &[ResultFiles],
    log: &[u8],
    mask: &Mask,
) -> Results {
    let mut r = Results::default();
    // Up to 64 MiB of output: a long one is parsed off the runtime's
    // threads; a short one here, where the hop to the blocking pool (two
    // thread wake-ups per step) would cost more than the parse.
    if log.len() <= PARSE_HERE {
        r.extend(from_output(log));
    } else {
        let owned = log.to_vec();
        r.extend(
            tokio::task::spawn_blocking(move || from_output(&owned))
                .await
                .unwrap_or_default(),
        );
    }
    if files.is_empty() {
        return r;
    }
    let fetch = async {
        for f in files {
            read_files(client, dir, f, mask, &mut r).await;
        }
    };
    if tokio::time::timeout(FETCH_LIMIT, fetch).await.is_err() {
        r.problems.push(format!(
            "reading result files took over {FETCH_LIMIT:?}; the rest were skipped"
        ));
    }
    r
}

/// The files under `dir` (relative to the work dir) that `glob` matches,
/// as paths relative to `dir`, sorted; a sentence when they cannot be
/// listed. Shared with the artifacts a step keeps.
pub(crate) async fn list_matching(
    client: &Client,
    dir: &str,
    glob: &str,
) -> Result<Vec<String>, String> {
    let base = glob_base(glob);
    let listed = if base.is_empty() {
        dir.to_string()
    } else {
        format!("{dir}/{base}")
    };
    let depth = |s: &str| s.split('/').filter(|p| !p.is_empty() && *p != ".").count();
    let opts = LsOptions {
        recursive: glob.contains("**") || depth(glob) > depth(&base) + 1,
        ..Default::default()
    };
    let entries = match client.ls(&listed, &opts).await {
        Ok(e) => e,
        // A glob whose directory does not exist matches nothing.
        Err(buildlet::client::Error::Rejected { status, .. })
            if status == http::StatusCode::NOT_FOUND && !base.is_empty() =>
        {
            return Ok(Vec::new());
        }
        Err(e) => return Err(format!("listing {listed}: {e}")),
    };
    let mut matched: Vec<String> = entries
        .into_iter()
        .filter(|e| e.kind == EntryKind::File)
        .map(|e| {
            if base.is_empty() {
                e.path
            } else {
                format!("{base}/{}", e.path)
            }
        })
        .filter(|p| glob_match(glob, p))
        .collect();
    matched.sort();
    Ok(matched)
}

async fn read_files(client: &Client, dir: &str, f: &ResultFiles, mask: &Mask, r: &mut Results) {
    let mut matched = match list_matching(client, dir, &f.glob).await {
        Ok(m) => m,
        Err(e) => {
            r.problems.push(format!("results {:?}: {e}", f.glob));
            return;
        }
    };
    if matched.is_empty() {
        r.problems
            .push(format!("results {:?}: no file matched", f.glob));
        return;
    }
    if matched.len() > MAX_FILES {
        r.problems.push(format!(
            "results {:?}: {} files matched; only the first {MAX_FILES} were read",
            f.glob,
            matched.len()
        ));
        matched.truncate(MAX_FILES);
    }
    for rel in matched {
        match fetch(client, &format!("{dir}/{rel}"), MAX_FILE).await {
            Ok(bytes) => match f.format.read(&mask.apply(&bytes)) {
                // Lines of a file are not lines of the step's log.
                Ok(tests) => r.extend(
                    tests
                        .into_iter()
                        .map(|t| super::TestResult { line: None, ..t })
                        .collect(),
                ),
                Err(e) => r.problems.push(format!("{rel}: {e}")),
            },
            Err(e) => r.problems.push(format!("{rel}: {e}")),
        }
    }
}

/// One file's content, through a one-entry `/tgz`, at most `cap` bytes.
pub(crate) async fn fetch(client: &Client, path: &str, cap: usize) -> Result<Vec<u8>, String> {
    let mut tgz = CappedBuffer {
        // An archive of a file that does not compress is a little larger.
        cap: cap + (cap >> 6) + (64 << 10),
        bytes: Vec::new(),
        overflowed: false,
        stop: true,
    };
    let got = client.get_tgz(path, &mut tgz, None).await;
    if tgz.overflowed {
        return Err(format!("larger than {} MiB; not read", cap >> 20));
    }
    got.map_err(|e| format!("fetching it: {e}"))?;
    // Unpacked off the async threads (up to tens of MiB).
    let bytes = std::mem::take(&mut tgz.bytes);
    tokio::task::spawn_blocking(move || unpack_one(&bytes, cap))
        .await
        .map_err(|e| format!("unpacking it: {e}"))?
}

/// The one file of a `/tgz` answer, at most `cap` bytes.
fn unpack_one(tgz: &[u8], cap: usize) -> Result<Vec<u8>, String> {
    let too_big = || format!("larger than {} MiB; not read", cap >> 20);
    // Bounded after decompression too: tar reads long-name and PAX headers
    // whole, and a machine could send a small archive of a huge one.
    let inflated = flate2::read::GzDecoder::new(tgz).take(cap as u64 + (1 << 20));
    let mut ar = tar::Archive::new(inflated);
    let mut entries = ar.entries().map_err(|e| format!("unpacking it: {e}"))?;
    let mut entry = entries
        .next()
        .ok_or("the machine sent an empty archive")?
        .map_err(|e| format!("unpacking it: {e}"))?;
    let mut out = Vec::new();
    (&mut entry)
        .take(cap as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("unpacking it: {e}"))?;
    if out.len() > cap {
        return Err(too_big());
    }
    Ok(out)
}
