//! Schedules: a cron expression in a time zone, and the job every tick
//! enqueues. Checked here once; the scheduler (maintenance) computes ticks
//! from a [`CronSpec`].

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{FieldError, JobId, JobRequest, ScheduleId};

/// The most jobs one catch-up may enqueue (`catch_up_limit`).
pub const MAX_CATCH_UP_LIMIT: i64 = 1000;
/// `catch_up_limit` when a schedule names none.
pub const DEFAULT_CATCH_UP_LIMIT: u32 = 100;
const MAX_NAME_LEN: usize = 200;
const MAX_CRON_LEN: usize = 200;

/// What a tick does while the schedule's previous job is unfinished.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// The tick is skipped.
    #[default]
    Skip,
    /// The tick enqueues a job anyway.
    Allow,
}

/// What happens to ticks missed while no scheduler ran (longer ago than
/// the grace period when a scheduler sees them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    /// Missed ticks are skipped.
    #[default]
    None,
    /// The most recent missed tick enqueues one job.
    Latest,
    /// Every missed tick enqueues a job, the most recent `catch_up_limit`.
    All,
}

impl Overlap {
    pub fn as_str(self) -> &'static str {
        match self {
            Overlap::Skip => "skip",
            Overlap::Allow => "allow",
        }
    }
}

impl CatchUp {
    pub fn as_str(self) -> &'static str {
        match self {
            CatchUp::None => "none",
            CatchUp::Latest => "latest",
            CatchUp::All => "all",
        }
    }
}

/// `POST /v1/schedules` (every field but `name`, `cron` and `job` optional)
/// and `PATCH /v1/schedules/{id}` (every field optional; absent ones stay).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleRequest {
    /// Unique, 1 to 200 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// 5 fields (minute hour day-of-month month day-of-week), or 6 with
    /// seconds first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// An IANA time zone (`Europe/Paris`); `UTC` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// The job every tick enqueues, as `POST /v1/jobs` takes it (without
    /// `idempotency_key`, `run_at` or `delay_secs`: a tick is its own key
    /// and time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
    /// `skip` (the default) or `allow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlap: Option<Overlap>,
    /// `none` (the default), `latest` or `all`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up: Option<CatchUp>,
    /// With `catch_up: all`, at most this many missed ticks (1 to 1000;
    /// 100 when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up_limit: Option<i64>,
}

/// A schedule as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Schedule {
    #[schema(value_type = String, format = Uuid)]
    pub id: ScheduleId,
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub job: JobRequest,
    pub paused: bool,
    pub overlap: Overlap,
    pub catch_up: CatchUp,
    pub catch_up_limit: u32,
    /// The first tick not handled yet (none if the pattern never matches
    /// again).
    pub next_tick: Option<DateTime<Utc>>,
    /// The last tick that enqueued a job.
    pub last_tick: Option<DateTime<Utc>>,
    #[schema(value_type = Option<String>, format = Uuid)]
    pub last_job_id: Option<JobId>,
    /// Why the last tick enqueued nothing, if it did not.
    pub last_error: Option<String>,
    pub version: i64,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A checked schedule, ready to store (`job` is checked by the
/// application, which knows the kinds).
#[derive(Debug, Clone, PartialEq)]
pub struct NewSchedule {
    pub name: String,
    pub spec: CronSpec,
    pub job: JobRequest,
    pub paused: bool,
    pub overlap: Overlap,
    pub catch_up: CatchUp,
    pub catch_up_limit: u32,
}

/// A parsed cron expression and time zone.
#[derive(Debug, Clone, PartialEq)]
pub struct CronSpec {
    cron: croner::Cron,
    expression: String,
    tz: chrono_tz::Tz,
}

impl CronSpec {
    pub fn parse(expression: &str, timezone: &str) -> Result<Self, FieldError> {
        if expression.len() > MAX_CRON_LEN {
            return Err(FieldError::new(
                "cron",
                format!("is longer than {MAX_CRON_LEN} bytes"),
            ));
        }
        let fields = expression.split_whitespace().count();
        if !(5..=6).contains(&fields) {
            return Err(FieldError::new(
                "cron",
                format!(
                    "has {fields} fields; cron takes 5 (minute hour day-of-month month day-of-week), or 6 with seconds first"
                ),
            ));
        }
        let parser = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .year(croner::parser::Year::Disallowed)
            .build();
        let cron = parser
            .parse(expression)
            .map_err(|e| FieldError::new("cron", format!("{expression:?} is not valid: {e}")))?;
        let tz: chrono_tz::Tz = timezone.parse().map_err(|_| {
            FieldError::new(
                "timezone",
                format!("{timezone:?} is not an IANA time zone (e.g. UTC, Europe/Paris)"),
            )
        })?;
        let spec = CronSpec {
            cron,
            expression: expression.split_whitespace().collect::<Vec<_>>().join(" "),
            tz,
        };
        if spec.next_after(Utc::now()).is_none() {
            return Err(FieldError::new("cron", "never matches a future time"));
        }
        Ok(spec)
    }

    /// The expression, with single spaces between fields.
    pub fn expression(&self) -> &str {
        &self.expression
    }

    pub fn timezone(&self) -> &str {
        self.tz.name()
    }

    /// The first tick strictly after `t`; `None` if there is none (a
    /// pattern such as February 30th).
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&whole_second(t).with_timezone(&self.tz), false)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The last tick strictly before `t`.
    pub fn previous_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&whole_second(t).with_timezone(&self.tz), false)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The last tick at or before `t`.
    pub fn latest_at(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&whole_second(t).with_timezone(&self.tz), true)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }
}

/// Ticks are whole seconds; croner keeps the fraction of its start time in
/// what it returns, so it is given none.
fn whole_second(t: DateTime<Utc>) -> DateTime<Utc> {
    use chrono::SubsecRound;
    t.trunc_subsecs(0)
}

impl ScheduleRequest {
    /// Checks a whole schedule (a POST, or a PATCH merged onto its
    /// schedule with [`ScheduleRequest::merged_onto`]).
    pub fn validate(self) -> Result<NewSchedule, FieldError> {
        let name = self
            .name
            .ok_or_else(|| FieldError::new("name", "is required"))?;
        if name.is_empty()
            || name.chars().count() > MAX_NAME_LEN
            || name.chars().any(char::is_control)
        {
            return Err(FieldError::new(
                "name",
                format!("must be 1 to {MAX_NAME_LEN} characters, none of them control characters"),
            ));
        }
        let cron = self
            .cron
            .ok_or_else(|| FieldError::new("cron", "is required"))?;
        let timezone = self.timezone.unwrap_or_else(|| "UTC".to_owned());
        let spec = CronSpec::parse(&cron, &timezone)?;
        let job = self
            .job
            .ok_or_else(|| FieldError::new("job", "is required"))?;
        for (field, given) in [
            ("job.idempotency_key", job.idempotency_key.is_some()),
            ("job.run_at", job.run_at.is_some()),
            ("job.delay_secs", job.delay_secs.is_some()),
        ] {
            if given {
                return Err(FieldError::new(
                    field,
                    "cannot be part of a schedule's job: every tick is its own key and time (use job.unique to bound duplicates)",
                ));
            }
        }
        let catch_up_limit = match self.catch_up_limit {
            None => DEFAULT_CATCH_UP_LIMIT,
            Some(n) if (1..=MAX_CATCH_UP_LIMIT).contains(&n) => n as u32,
            Some(n) => {
                return Err(FieldError::new(
                    "catch_up_limit",
                    format!("must be between 1 and {MAX_CATCH_UP_LIMIT}, got {n}"),
                ))
            }
        };
        Ok(NewSchedule {
            name,
            spec,
            job,
            paused: self.paused.unwrap_or(false),
            overlap: self.overlap.unwrap_or_default(),
            catch_up: self.catch_up.unwrap_or_default(),
            catch_up_limit,
        })
    }

    /// A PATCH: the fields it gives replace the schedule's.
    pub fn merged_onto(self, current: &Schedule) -> ScheduleRequest {
        ScheduleRequest {
            name: self.name.or_else(|| Some(current.name.clone())),
            cron: self.cron.or_else(|| Some(current.cron.clone())),
            timezone: self.timezone.or_else(|| Some(current.timezone.clone())),
            job: self.job.or_else(|| Some(current.job.clone())),
            paused: self.paused.or(Some(current.paused)),
            overlap: self.overlap.or(Some(current.overlap)),
            catch_up: self.catch_up.or(Some(current.catch_up)),
            catch_up_limit: self
                .catch_up_limit
                .or(Some(i64::from(current.catch_up_limit))),
        }
    }
}

/// Most ticks walked in one pass: a schedule every second down for 11
/// days. Past it the walk starts again at the grace period, dropping
/// missed ticks no `catch_up_limit` (at most 1000) would keep anyway
/// unless the schedule ticks faster than that.
const MAX_WALK: u32 = 1_000_000;

/// The ticks due by `now`, from the first unhandled one (`next_tick`), and
/// the tick to wait for after them. A tick older than `grace` is missed:
/// `catch_up` says which missed ticks still run (the most recent ones).
/// Walked forward with croner, which places a tick that daylight saving
/// skips at the first time after the change (as cron does), and runs a
/// wall time that occurs twice once, the first time.
pub fn due_ticks(
    spec: &CronSpec,
    next_tick: DateTime<Utc>,
    now: DateTime<Utc>,
    grace: chrono::Duration,
    catch_up: CatchUp,
    catch_up_limit: u32,
) -> (Vec<DateTime<Utc>>, Option<DateTime<Utc>>) {
    let keep = match catch_up {
        CatchUp::None => 0,
        CatchUp::Latest => 1,
        CatchUp::All => catch_up_limit as usize,
    };
    // The first tick at or after `next_tick` (it is one, unless edited).
    let mut t = spec
        .next_after(next_tick - chrono::Duration::seconds(1))
        .and_then(|t| {
            if t < next_tick {
                spec.next_after(t)
            } else {
                Some(t)
            }
        });
    let mut missed = std::collections::VecDeque::with_capacity(keep.min(1024));
    let mut on_time = Vec::new();
    let mut walked = 0;
    while let Some(tick) = t.filter(|t| *t <= now) {
        walked += 1;
        if walked > MAX_WALK {
            missed.clear();
            t = spec.next_after(now - grace - chrono::Duration::seconds(1));
            walked = 0;
            continue;
        }
        if tick < now - grace {
            if keep > 0 {
                if missed.len() == keep {
                    missed.pop_front();
                }
                missed.push_back(tick);
            }
        } else {
            on_time.push(tick);
        }
        t = spec.next_after(tick);
    }
    let mut due: Vec<DateTime<Utc>> = missed.into_iter().collect();
    due.extend(on_time);
    (due, t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 1, h, m, s)
            .single()
            .expect("valid")
    }

    #[test]
    fn cron_takes_five_or_six_fields() {
        assert!(CronSpec::parse("0 3 * * *", "UTC").is_ok());
        assert!(CronSpec::parse("*/5 0 3 * * *", "Europe/Paris").is_ok());
        for bad in ["", "* * * *", "0 0 0 1 1 * 2030", "61 * * * *", "@daily"] {
            let err = CronSpec::parse(bad, "UTC").expect_err(bad);
            assert_eq!(err.field, "cron", "{bad}: {err}");
        }
        let err = CronSpec::parse("* * * * *", "Mars/Olympus").expect_err("tz");
        assert_eq!(err.field, "timezone");
        assert!(
            CronSpec::parse("0 0 30 2 *", "UTC").is_err(),
            "never matches"
        );
    }

    #[test]
    fn ticks_follow_the_time_zone() {
        // 03:00 in Paris is 02:00 UTC in winter (CET, UTC+1).
        let spec = CronSpec::parse("0 3 * * *", "Europe/Paris").expect("valid");
        assert_eq!(spec.next_after(at(0, 0, 0)), Some(at(2, 0, 0)));
        let every_second = CronSpec::parse("* * * * * *", "UTC").expect("valid");
        assert_eq!(every_second.next_after(at(1, 2, 3)), Some(at(1, 2, 4)));
        let fraction = at(1, 2, 3) + chrono::Duration::milliseconds(600);
        assert_eq!(every_second.next_after(fraction), Some(at(1, 2, 4)));
        assert_eq!(every_second.latest_at(fraction), Some(at(1, 2, 3)));
    }

    #[test]
    fn catch_up_keeps_what_it_says() {
        let spec = CronSpec::parse("* * * * *", "UTC").expect("valid");
        let grace = chrono::Duration::seconds(60);
        // Down from 10:00 to 10:10:30: ticks 10:00..10:10 are due; those
        // before 10:09:30 are missed.
        let (due, next) = due_ticks(
            &spec,
            at(10, 0, 0),
            at(10, 10, 30),
            grace,
            CatchUp::None,
            100,
        );
        assert_eq!(due, vec![at(10, 10, 0)]);
        assert_eq!(next, Some(at(10, 11, 0)));
        let (due, _) = due_ticks(
            &spec,
            at(10, 0, 0),
            at(10, 10, 30),
            grace,
            CatchUp::Latest,
            100,
        );
        assert_eq!(due, vec![at(10, 9, 0), at(10, 10, 0)]);
        let (due, _) = due_ticks(&spec, at(10, 0, 0), at(10, 10, 30), grace, CatchUp::All, 3);
        assert_eq!(
            due,
            vec![at(10, 7, 0), at(10, 8, 0), at(10, 9, 0), at(10, 10, 0)]
        );
        let (due, _) = due_ticks(
            &spec,
            at(10, 0, 0),
            at(10, 10, 30),
            grace,
            CatchUp::All,
            100,
        );
        assert_eq!(due.len(), 11);
        // Nothing due yet.
        let (due, next) = due_ticks(
            &spec,
            at(10, 11, 0),
            at(10, 10, 30),
            grace,
            CatchUp::All,
            100,
        );
        assert!(due.is_empty());
        assert_eq!(next, Some(at(10, 11, 0)));
    }

    #[test]
    fn daylight_saving_neither_loses_nor_doubles_a_daily_tick() {
        let spec = CronSpec::parse("30 2 * * *", "Europe/Paris").expect("valid");
        let grace = chrono::Duration::seconds(60);
        // 2026-03-29: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist.
        let before = Utc
            .with_ymd_and_hms(2026, 3, 29, 0, 0, 0)
            .single()
            .expect("t");
        let next = spec.next_after(before).expect("a tick");
        let after_change = Utc
            .with_ymd_and_hms(2026, 3, 29, 1, 0, 30)
            .single()
            .expect("t");
        let (due, _) = due_ticks(&spec, next, after_change, grace, CatchUp::None, 100);
        assert_eq!(
            due.len(),
            1,
            "the skipped 02:30 runs once after the change: {due:?}"
        );
        // 2026-10-25: 03:00 CEST falls back to 02:00 CET; 02:30 happens twice.
        let before = Utc
            .with_ymd_and_hms(2026, 10, 24, 23, 0, 0)
            .single()
            .expect("t");
        let next = spec.next_after(before).expect("a tick");
        let end = Utc
            .with_ymd_and_hms(2026, 10, 25, 2, 0, 0)
            .single()
            .expect("t");
        let (due, _) = due_ticks(
            &spec,
            next,
            end,
            chrono::Duration::hours(3),
            CatchUp::None,
            100,
        );
        assert_eq!(due.len(), 1, "a repeated 02:30 runs once: {due:?}");
    }

    #[test]
    fn a_long_outage_keeps_the_most_recent_ticks() {
        let spec = CronSpec::parse("* * * * * *", "UTC").expect("valid");
        let grace = chrono::Duration::seconds(2);
        let (due, next) = due_ticks(&spec, at(0, 0, 0), at(12, 0, 0), grace, CatchUp::All, 5);
        // 11:59:58..12:00:00 are within the grace, then the 5 latest missed.
        assert_eq!(due.first(), Some(&at(11, 59, 53)), "{due:?}");
        assert_eq!(due.len(), 8, "{due:?}");
        assert_eq!(due.last(), Some(&at(12, 0, 0)));
        assert_eq!(next, Some(at(12, 0, 1)));
    }
}
