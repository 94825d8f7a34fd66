//! Tests across builds: one test (`/tests/{name}`) on every builder and
//! commit, with the first commit of its current failing run per builder;
//! and the flakiest tests (`/flakes`). Both take `?mode=json`.

use std::collections::BTreeMap;
use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, Query, State};
use serde::{Deserialize, Serialize};

use super::util::{date_secs, short};
use super::{Layout, PageError, PageResult, html, json};
use crate::farm::Farm;
use crate::store::{FlakeRow, TestRow};

/// Results of one test read for its page (the newest).
const HISTORY: i64 = 2000;
/// Commits (rows) its grid shows.
const COMMITS: usize = 30;
/// Recent builds per builder the flake rates are over, by default.
const FLAKE_BUILDS: i64 = 100;
/// Most rows of `/flakes`.
const FLAKE_ROWS: i64 = 200;

/// One cell of a test's grid.
#[derive(Debug, Clone, Serialize)]
pub struct TestCell {
    pub outcome: String,
    pub build_id: i64,
    /// `#l-STEP-LINE` on the build page when the log shows the failure.
    pub anchor: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct TestCommit {
    pub commit: String,
    #[serde(skip)]
    pub short: String,
    pub time: i64,
    #[serde(skip)]
    pub date: String,
    /// One per builder column; `None` where that builder has no result.
    pub cells: Vec<Option<TestCell>>,
}

/// Where a test stands on one builder.
#[derive(Debug, Clone, Serialize)]
pub struct TestOnBuilder {
    pub builder: String,
    /// Its newest outcome there.
    pub last: String,
    /// When it fails now: the oldest commit of the failing run that
    /// reaches the newest result (where it started failing, as far as the
    /// history read shows).
    pub first_failing: Option<String>,
    pub first_failing_build: Option<i64>,
    pub runs: usize,
    pub failures: usize,
    pub flaky: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct TestView {
    pub name: String,
    pub builders: Vec<TestOnBuilder>,
    pub commits: Vec<TestCommit>,
    /// The newest failure's text.
    pub last_failure: String,
}

#[derive(Template)]
#[template(path = "test.html")]
struct TestPage {
    l: Layout,
    v: TestView,
}

#[derive(Deserialize)]
pub struct ModeQuery {
    mode: Option<String>,
    builds: Option<i64>,
}

fn view(name: String, rows: Vec<TestRow>) -> TestView {
    // Newest first already; one result per (commit, builder): the newest.
    let mut by_builder: BTreeMap<String, Vec<&TestRow>> = BTreeMap::new();
    for r in &rows {
        by_builder.entry(r.builder.clone()).or_default().push(r);
    }
    let builders: Vec<TestOnBuilder> = by_builder
        .iter()
        .map(|(b, rs)| {
            let failing: Vec<&&TestRow> = rs.iter().take_while(|r| r.outcome == "fail").collect();
            TestOnBuilder {
                builder: b.clone(),
                last: rs.first().map(|r| r.outcome.clone()).unwrap_or_default(),
                first_failing: failing.last().map(|r| r.commit.clone()),
                first_failing_build: failing.last().map(|r| r.build_id),
                runs: rs.len(),
                failures: rs.iter().filter(|r| r.outcome == "fail").count(),
                flaky: rs.iter().filter(|r| r.outcome == "flaky").count(),
            }
        })
        .collect();
    let columns: Vec<&String> = by_builder.keys().collect();
    let mut commits: Vec<TestCommit> = Vec::new();
    for r in &rows {
        let i = match commits.iter().position(|c| c.commit == r.commit) {
            Some(i) => i,
            None if commits.len() < COMMITS => {
                commits.push(TestCommit {
                    short: short(&r.commit).to_string(),
                    date: date_secs(r.commit_time),
                    commit: r.commit.clone(),
                    time: r.commit_time,
                    cells: vec![None; columns.len()],
                });
                commits.len() - 1
            }
            None => continue,
        };
        let col = columns.iter().position(|b| **b == r.builder).unwrap_or(0);
        if commits[i].cells[col].is_none() {
            commits[i].cells[col] = Some(TestCell {
                outcome: r.outcome.clone(),
                build_id: r.build_id,
                anchor: r
                    .log_line
                    .map(|l| format!("#l-{}-{l}", r.step_id))
                    .unwrap_or_default(),
            });
        }
    }
    TestView {
        last_failure: rows
            .iter()
            .find(|r| r.outcome == "fail" || r.outcome == "flaky")
            .map(|r| r.failure.clone())
            .unwrap_or_default(),
        name,
        builders,
        commits,
    }
}

pub async fn test_page(
    State(farm): State<Arc<Farm>>,
    Path(name): Path<String>,
    Query(q): Query<ModeQuery>,
) -> PageResult {
    let rows = farm.store.test_history(&name, HISTORY).await?;
    if rows.is_empty() {
        return Err(PageError::NotFound(format!(
            "No build has recorded a result for a test named {name:?}."
        )));
    }
    let v = view(name, rows);
    if q.mode.as_deref() == Some("json") {
        return json(&v);
    }
    html(&TestPage {
        l: Layout::new(format!("Test {}", v.name), ""),
        v,
    })
}

#[derive(Serialize)]
pub struct FlakesView {
    /// Recent builds per builder the rates are over.
    pub builds: i64,
    pub tests: Vec<FlakeRow>,
}

#[derive(Template)]
#[template(path = "flakes.html")]
struct FlakesPage {
    l: Layout,
    v: FlakesView,
}

pub async fn flakes_page(State(farm): State<Arc<Farm>>, Query(q): Query<ModeQuery>) -> PageResult {
    let builds = q.builds.unwrap_or(FLAKE_BUILDS).clamp(1, 10_000);
    let v = FlakesView {
        builds,
        tests: farm.store.flake_rates(builds, FLAKE_ROWS).await?,
    };
    if q.mode.as_deref() == Some("json") {
        return json(&v);
    }
    html(&FlakesPage {
        l: Layout::new("Flaky tests", "flakes"),
        v,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(builder: &str, commit: &str, time: i64, outcome: &str, build: i64) -> TestRow {
        TestRow {
            id: build,
            build_id: build,
            attempt_id: 1,
            step_id: 1,
            builder: builder.into(),
            commit: commit.into(),
            commit_time: time,
            name: "t".into(),
            outcome: outcome.into(),
            duration_ms: None,
            failure: format!("{outcome} at {commit}"),
            log_line: Some(3),
        }
    }

    #[test]
    fn first_failing_commit_is_the_oldest_of_the_current_failing_run() {
        // Newest first, as the store returns them.
        let v = view(
            "t".into(),
            vec![
                row("a", "c4", 4, "fail", 14),
                row("b", "c4", 4, "pass", 24),
                row("a", "c3", 3, "fail", 13),
                row("a", "c2", 2, "pass", 12),
                row("a", "c1", 1, "fail", 11),
            ],
        );
        let a = &v.builders[0];
        assert_eq!(a.first_failing.as_deref(), Some("c3"));
        assert_eq!(a.first_failing_build, Some(13));
        assert_eq!((a.runs, a.failures), (4, 3));
        assert_eq!(v.builders[1].first_failing, None);
        assert_eq!(v.commits.len(), 4);
        assert_eq!(v.commits[0].cells[1].as_ref().unwrap().outcome, "pass");
        assert_eq!(v.commits[0].cells[0].as_ref().unwrap().anchor, "#l-1-3");
        assert_eq!(v.last_failure, "fail at c4");
    }
}
