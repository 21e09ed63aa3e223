//! One MiB of what Claude prints on a busy job, made the same way every time: stream-json
//! lines of prose, tool results with code and logs, a wrapped base64 block and an `xxd`
//! dump. Shared by the redaction benchmark (and, with `#[path]`, by a copy of an older
//! redactor measured the same way).

/// The secrets a busy agent holds: two OAuth tokens, its key, a runner secret, a GitHub token.
pub const SECRETS: [&str; 5] = [
    "sk-ant-oat01-Zq3v8xW2mN4bR7tY1uI5oP9aS6dF0gH3jK8lZ2xC5vB7nM1qW4eR9tY6uI0oP3aS8dF2gH5jK7lZ-abcdefAA",
    "sk-ant-ort01-Pq9w2E4r6T8y0U2i4O6p8A0s2D4f6G8h0J2k4L6z8X0c2V4b6N8m0Q2w4E6r8T0y2U4i6O8p0A2s4D6f8G-0123BB",
    "hK4q2N8v6Z1x3C5b7M9n0Q2w4E6r8T0y2U4i6O8p0A=",
    "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "ghp_R2d9Xk4Lq7Wm1Zp8Vt3Ns6Hy0Bc5Jf2Ga4Eu",
];

pub fn output() -> Vec<String> {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let words = ["the", "agent", "runs", "a", "job", "in", "its", "workspace", "and", "reads", "src/main.rs", "then", "fn", "let", "Ok(())", "100%", "C:\\path", "{\"k\":1}"];
    let mut lines = Vec::new();
    let mut size = 0;
    let mut n = 0;
    while size < 1024 * 1024 {
        n += 1;
        let mut text = String::new();
        let kind = next() % 10;
        let len = if kind < 4 { 400 } else { 4000 };
        while text.len() < len {
            text.push_str(words[(next() % words.len() as u64) as usize]);
            text.push(if next() % 12 == 0 { '\n' } else { ' ' });
        }
        let line = match kind {
            0..=3 => serde_json::json!({"type":"assistant","message":{"role":"assistant","content":[{"type":"text","text":text}]},"session_id":"0b7c1c7e-0000-4000-8000-000000000000"}),
            4 if n % 20 == 4 => {
                // `base64 FILE`: 76 columns.
                let blob: Vec<u8> = (0..12 * 1024).map(|_| next() as u8).collect();
                let b64 = base64_encode(&blob);
                let wrapped: Vec<&str> = b64.as_bytes().chunks(76).map(|c| std::str::from_utf8(c).unwrap()).collect();
                tool_result(&wrapped.join("\n"))
            }
            5 if n % 20 == 5 => {
                let blob: Vec<u8> = (0..4 * 1024).map(|_| next() as u8).collect();
                tool_result(&xxd(&blob))
            }
            _ => tool_result(&text),
        };
        let line = line.to_string();
        size += line.len() + 1;
        lines.push(line);
    }
    lines
}

/// The texts the lines carry, decoded and joined: what a result's `output` looks like.
pub fn texts(lines: &[String]) -> String {
    let mut out = String::new();
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line).expect("the lines are JSON");
        let content = &v["message"]["content"][0];
        out.push_str(content["text"].as_str().or(content["content"].as_str()).unwrap_or_default());
        out.push('\n');
    }
    out
}

fn tool_result(text: &str) -> serde_json::Value {
    serde_json::json!({"type":"user","message":{"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_01","content":text}]}})
}

fn base64_encode(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            out.push(if i <= c.len() { A[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

fn xxd(bytes: &[u8]) -> String {
    let mut out = String::new();
    for (i, line) in bytes.chunks(16).enumerate() {
        out.push_str(&format!("{:08x}: ", i * 16));
        for pair in line.chunks(2) {
            for b in pair {
                out.push_str(&format!("{b:02x}"));
            }
            out.push(' ');
        }
        out.push(' ');
        out.extend(line.iter().map(|&b| if (0x20..0x7f).contains(&b) { b as char } else { '.' }));
        out.push('\n');
    }
    out
}
