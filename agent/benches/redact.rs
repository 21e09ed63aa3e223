//! Throughput of the redactor on one MiB of a job's output (`output.rs`), as the job runner
//! uses it: every stdout line through `Redactor::redact_line` (parse, redact each decoded
//! string, carry between lines), and one MiB of text through `Redactor::redact` (a result).
//! Median of 15 runs after 3 warm-ups, in CPU time of the thread.
//!
//!     cargo bench -p claude-runner --bench redact

mod measure;

#[path = "output.rs"]
mod output;

use agent_core::redact::{Carry, Redactor};

/// Median of 15 runs after 3 warm-ups ([`measure::median_mib_s`]).
fn median_mib_s(bytes: usize, run: impl FnMut()) -> f64 {
    measure::median_mib_s(bytes, 3, 15, run)
}

fn main() {
    let lines = output::output();
    let bytes: usize = lines.iter().map(|l| l.len() + 1).sum();
    let redactor = Redactor::new(output::SECRETS.iter().map(|s| s.to_string()));
    let per_line = median_mib_s(bytes, || {
        let mut carry = Carry::default();
        for line in &lines {
            std::hint::black_box(redactor.redact_line(line, &mut carry).ok());
        }
    });
    let parse_only = median_mib_s(bytes, || {
        for line in &lines {
            std::hint::black_box(serde_json::from_str::<serde_json::Value>(line).ok());
        }
    });
    // A result: the texts the lines carry, decoded (prose, code, base64, a hex dump).
    let text = output::texts(&lines);
    let whole = median_mib_s(text.len(), || {
        std::hint::black_box(redactor.redact(&text));
    });
    // The worst case: text full of escapes (the raw lines), read twice.
    let raw = lines.join("\n");
    let escaped = median_mib_s(raw.len(), || {
        std::hint::black_box(redactor.redact(&raw));
    });
    // The most the agent's login memory holds (`oauth::REMEMBERED` logins: three more
    // than the one in SECRETS, an access and a refresh token each, of the same shape).
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut token = |len: usize| -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                ALPHABET[(seed % 64) as usize] as char
            })
            .collect()
    };
    let extra: Vec<String> = (0..6).map(|n| format!("sk-ant-o{}t01-{}", if n % 2 == 0 { 'a' } else { 'r' }, token(95))).collect();
    let remembered = Redactor::new(output::SECRETS.iter().map(|s| s.to_string()).chain(extra));
    let per_line_remembered = median_mib_s(bytes, || {
        let mut carry = Carry::default();
        for line in &lines {
            std::hint::black_box(remembered.redact_line(line, &mut carry).ok());
        }
    });
    // A month of Claude's 8-hourly refreshes (`oauth::REMEMBERED`): the memory masks each
    // replaced login by its refresh token alone once its access token is dead, so about 90
    // refresh tokens, beside two live logins (the file's and the one its last refresh
    // replaced) and the other secrets.
    let month: Vec<String> = output::SECRETS
        .iter()
        .map(|s| s.to_string())
        .chain((0..94).map(|n| format!("sk-ant-o{}t01-{}", if n < 4 && n % 2 == 0 { 'a' } else { 'r' }, token(95))))
        .collect();
    let month_redactor = Redactor::new(month.clone());
    let per_line_month = median_mib_s(bytes, || {
        let mut carry = Carry::default();
        for line in &lines {
            std::hint::black_box(month_redactor.redact_line(line, &mut carry).ok());
        }
    });
    let escaped_month = median_mib_s(raw.len(), || {
        std::hint::black_box(month_redactor.redact(&raw));
    });
    // Building one: each job's runner, and each repository job's git worker (`repo::worker`),
    // builds its own.
    let build = |secrets: &[String]| measure::median_seconds(1, 7, || {
        std::hint::black_box(Redactor::new(secrets.iter().cloned()));
    }) * 1000.0;
    let build_few = build(&output::SECRETS.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    let build_month = build(&month);
    println!("redaction of {:.2} MiB in {} stream-json lines, {} secrets:", bytes as f64 / 1048576.0, lines.len(), output::SECRETS.len());
    println!("  per line (parse + redact each string + carry): {per_line:.0} MiB/s");
    println!("  of which JSON parsing alone:                   {parse_only:.0} MiB/s");
    println!("  one text of {:.2} MiB (a result):              {whole:.0} MiB/s", text.len() as f64 / 1048576.0);
    println!("  one text of 1 MiB full of escapes (worst case): {escaped:.0} MiB/s");
    println!("  per line, with 4 logins remembered (11 secrets): {per_line_remembered:.0} MiB/s");
    println!("  per line, a month of logins ({} secrets): {per_line_month:.0} MiB/s", month.len());
    println!("  1 MiB full of escapes, a month of logins:       {escaped_month:.0} MiB/s");
    println!("  building a redactor: {build_few:.2} ms for {} secrets, {build_month:.1} ms for a month of logins", output::SECRETS.len());
}
