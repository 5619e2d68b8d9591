//! The names the pods of a workload get, as regular expressions: what the controllers and the
//! API server's `generateName` produce, and the host name the kubelet derives from the name.
//!
//! A generated name is `base[:58] + 5 random characters` (the API server's
//! `SimpleNameGenerator` cuts the base at 58 bytes so that the name fits 63). Where the base has
//! a part of variable length (a Deployment's pod-template hash, a CronJob's schedule time, an
//! Indexed Job's index), the cut falls at a different place for each length: every length is
//! written out and the alternatives joined, so the expression is exact, not a prefix match.

/// A part of a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    /// Literal text.
    Lit(String),
    /// `min..=max` characters of a class (written as a regex class, e.g. `[a-z0-9]`).
    Class {
        /// The class.
        class: &'static str,
        /// Fewest characters.
        min: usize,
        /// Most characters.
        max: usize,
    },
}

/// The characters of random name suffixes and pod-template hashes (a superset of the API
/// server's alphabet `bcdfghjklmnpqrstvwxz2456789`).
pub const ALNUM: &str = "[a-z0-9]";
/// Digits (ordinals, indexes, schedule times).
pub const DIGITS: &str = "[0-9]";

/// The longest base `generateName` keeps.
const GENERATE_BASE_MAX: usize = 58;
/// The longest host name the kubelet gives a pod.
const HOSTNAME_MAX: usize = 63;

/// The pod names of one workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodNames {
    /// Exactly these parts (a Pod's name, a StatefulSet's ordinal names).
    Exact(Vec<Part>),
    /// `generateName` of one of these bases: the base (cut at 58 bytes) and 5 random
    /// characters.
    Generated(Vec<Vec<Part>>),
}

fn lit(s: &str) -> Part {
    Part::Lit(s.to_string())
}

fn class(class: &'static str, min: usize, max: usize) -> Part {
    Part::Class { class, min, max }
}

impl PodNames {
    /// The names of a Pod with `name`.
    pub fn pod(name: &str) -> Self {
        Self::Exact(vec![lit(name)])
    }

    /// The names of a Pod with only `generateName`.
    pub fn generated(base: &str) -> Self {
        Self::Generated(vec![vec![lit(base)]])
    }

    /// A Deployment's pods: `<name>-<pod-template-hash>-<5>`, through its ReplicaSet
    /// `<name>-<hash>` (the hash: up to 10 characters).
    pub fn deployment(name: &str) -> Self {
        Self::Generated(vec![vec![
            lit(&format!("{name}-")),
            class(ALNUM, 1, 10),
            lit("-"),
        ]])
    }

    /// A ReplicaSet's or DaemonSet's pods, and a non-indexed Job's: `<name>-<5>`.
    pub fn replica_set(name: &str) -> Self {
        Self::Generated(vec![vec![lit(&format!("{name}-"))]])
    }

    /// An Indexed Job's pods: `<name>-<index>-<5>` with an index below `completions`, where
    /// the Job controller cuts the name (not the index) to fit 58; or, from controllers before
    /// Kubernetes 1.28, `<name>-<5>`.
    pub fn indexed_job(name: &str, completions: u64) -> Self {
        let digits = completions.saturating_sub(1).to_string().len();
        let mut bases = vec![vec![lit(&format!("{name}-"))]];
        for n in 1..=digits {
            let keep = GENERATE_BASE_MAX.saturating_sub(n + 2).min(name.len());
            let mut cut = keep;
            while !name.is_char_boundary(cut) {
                cut -= 1;
            }
            bases.push(vec![
                lit(&format!("{}-", &name[..cut])),
                class(DIGITS, n, n),
                lit("-"),
            ]);
        }
        Self::Generated(bases)
    }

    /// An Indexed CronJob's pods: its Job's name (`<name>-<minutes>`) is cut by the Job
    /// controller to make room for the index, so only the first 40 characters of the name
    /// are certain: the pattern is that prefix and any name characters after it (lenient).
    pub fn indexed_cron_job(name: &str) -> Self {
        let mut keep = name.len().min(40);
        while !name.is_char_boundary(keep) {
            keep -= 1;
        }
        let prefix = &name[..keep];
        Self::Exact(vec![
            lit(prefix),
            class(
                "[a-z0-9-]",
                1,
                HOSTNAME_MAX.saturating_sub(prefix.len()).max(1),
            ),
        ])
    }

    /// A StatefulSet's pods: `<name>-<ordinal>`.
    pub fn stateful_set(name: &str) -> Self {
        Self::Exact(vec![lit(&format!("{name}-")), class(DIGITS, 1, 10)])
    }

    /// A CronJob's pods: its Jobs are `<name>-<scheduled time in minutes>`, their pods
    /// `<job>-<5>`.
    pub fn cron_job(name: &str) -> Self {
        Self::Generated(vec![vec![
            lit(&format!("{name}-")),
            class(DIGITS, 1, 10),
            lit("-"),
        ]])
    }

    /// The regular expression of the pod names (anchored).
    pub fn name_regex(&self) -> String {
        format!("^{}$", self.body(usize::MAX, false))
    }

    /// The regular expression (unanchored body) of the host names the kubelet gives these pods
    /// without `spec.hostname`: the name cut at 63 bytes, trailing `-` and `.` removed.
    pub fn hostname_body(&self) -> String {
        self.body(HOSTNAME_MAX, true)
    }

    fn body(&self, cut: usize, trim: bool) -> String {
        let full = match self {
            Self::Exact(parts) => parts.clone(),
            Self::Generated(bases) => {
                let mut alternatives: Vec<Vec<Part>> = bases
                    .iter()
                    .flat_map(|b| cut_parts(b, GENERATE_BASE_MAX, false))
                    .collect();
                for a in &mut alternatives {
                    a.push(class(ALNUM, 5, 5));
                }
                return join(
                    alternatives
                        .iter()
                        .flat_map(|a| cut_parts(a, cut, trim))
                        .collect(),
                );
            }
        };
        join(cut_parts(&full, cut, trim))
    }
}

/// The most characters `parts` can have.
fn max_len(parts: &[Part]) -> usize {
    parts
        .iter()
        .map(|p| match p {
            Part::Lit(s) => s.len(),
            Part::Class { max, .. } => *max,
        })
        .sum()
}

/// `parts` cut to `cut` bytes (and, with `trim`, without trailing `-` and `.`), as one or more
/// alternatives. When no variant is longer than `cut`, the parts come back as they are.
fn cut_parts(parts: &[Part], cut: usize, trim: bool) -> Vec<Vec<Part>> {
    if max_len(parts) <= cut && !(trim && ends_with_trimmable(parts)) {
        return vec![parts.to_vec()];
    }
    // Every combination of lengths of the variable parts, each cut.
    let mut variants: Vec<Vec<Part>> = vec![Vec::new()];
    for p in parts {
        match p {
            Part::Lit(_) => variants.iter_mut().for_each(|v| v.push(p.clone())),
            Part::Class { class, min, max } => {
                let mut next = Vec::new();
                for v in &variants {
                    for n in *min..=*max {
                        let mut v = v.clone();
                        v.push(Part::Class {
                            class,
                            min: n,
                            max: n,
                        });
                        next.push(v);
                    }
                }
                variants = next;
            }
        }
    }
    let mut out: Vec<Vec<Part>> = Vec::new();
    for v in variants {
        let mut left = cut;
        let mut cut_v = Vec::new();
        for p in v {
            if left == 0 {
                break;
            }
            match p {
                Part::Lit(s) => {
                    // Names are ASCII (DNS labels and subdomains); cut on a char boundary anyway.
                    let mut end = s.len().min(left);
                    while !s.is_char_boundary(end) {
                        end -= 1;
                    }
                    left -= end;
                    cut_v.push(Part::Lit(s[..end].to_string()));
                }
                Part::Class { class, min, .. } => {
                    let n = min.min(left);
                    left -= n;
                    cut_v.push(Part::Class {
                        class,
                        min: n,
                        max: n,
                    });
                }
            }
        }
        if trim {
            trim_tail(&mut cut_v);
        }
        let merged = merge(cut_v);
        if !out.contains(&merged) {
            out.push(merged);
        }
    }
    out
}

fn ends_with_trimmable(parts: &[Part]) -> bool {
    match parts
        .iter()
        .rev()
        .find(|p| !matches!(p, Part::Lit(s) if s.is_empty()))
    {
        Some(Part::Lit(s)) => s.ends_with(['-', '.']),
        _ => false,
    }
}

/// Removes trailing `-` and `.` (the classes here never hold them).
fn trim_tail(parts: &mut Vec<Part>) {
    while let Some(last) = parts.last_mut() {
        match last {
            Part::Lit(s) => {
                let t = s.trim_end_matches(['-', '.']).len();
                s.truncate(t);
                if s.is_empty() {
                    parts.pop();
                } else {
                    return;
                }
            }
            Part::Class { max: 0, .. } => {
                parts.pop();
            }
            Part::Class { .. } => return,
        }
    }
}

/// Joins adjacent literals and adjacent runs of the same class.
fn merge(parts: Vec<Part>) -> Vec<Part> {
    let mut out: Vec<Part> = Vec::new();
    for p in parts {
        match (out.last_mut(), p) {
            (_, Part::Lit(s)) if s.is_empty() => {}
            (_, Part::Class { max: 0, .. }) => {}
            (Some(Part::Lit(a)), Part::Lit(b)) => a.push_str(&b),
            (
                Some(Part::Class {
                    class: c1,
                    min: n1,
                    max: x1,
                }),
                Part::Class {
                    class: c2,
                    min: n2,
                    max: x2,
                },
            ) if *c1 == c2 && n1 == x1 && n2 == x2 => {
                *n1 += n2;
                *x1 += x2;
            }
            (_, p) => out.push(p),
        }
    }
    out
}

/// `text` as a regular expression matching exactly it: the metacharacters of the `regex`
/// crate (and of Rego's `regex.match`, which uses it) escaped; `-`, which is special only in a
/// class, is left as is for readability.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn render(parts: &[Part]) -> String {
    parts
        .iter()
        .map(|p| match p {
            Part::Lit(s) => escape(s),
            Part::Class { class, min, max } if min == max => format!("{class}{{{min}}}"),
            Part::Class { class, min, max } => format!("{class}{{{min},{max}}}"),
        })
        .collect()
}

fn join(alternatives: Vec<Vec<Part>>) -> String {
    let mut rendered: Vec<String> = Vec::new();
    for a in &alternatives {
        let r = render(a);
        if !rendered.contains(&r) {
            rendered.push(r);
        }
    }
    match rendered.len() {
        1 => rendered.remove(0),
        _ => format!("(?:{})", rendered.join("|")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(re: &str, s: &str) -> bool {
        regex::Regex::new(re).unwrap().is_match(s)
    }

    #[test]
    fn each_kind_has_its_pattern() {
        assert_eq!(PodNames::pod("web").name_regex(), "^web$");
        assert_eq!(
            PodNames::deployment("web").name_regex(),
            "^web-[a-z0-9]{1,10}-[a-z0-9]{5}$"
        );
        assert_eq!(
            PodNames::replica_set("web").name_regex(),
            "^web-[a-z0-9]{5}$"
        );
        assert_eq!(
            PodNames::stateful_set("db").name_regex(),
            "^db-[0-9]{1,10}$"
        );
        assert_eq!(
            PodNames::cron_job("tick").name_regex(),
            "^tick-[0-9]{1,10}-[a-z0-9]{5}$"
        );
        assert_eq!(
            PodNames::indexed_job("batch", 12).name_regex(),
            "^(?:batch-[a-z0-9]{5}|batch-[0-9]{1}-[a-z0-9]{5}|batch-[0-9]{2}-[a-z0-9]{5})$"
        );
        // The Job controller cuts the name, not the index.
        let long = "j".repeat(60);
        let re = PodNames::indexed_job(&long, 3).name_regex();
        assert!(matches(&re, &format!("{}-2-abcde", "j".repeat(55))));
        assert!(matches(&re, &format!("{}abcde", "j".repeat(58))));
        let re = PodNames::indexed_cron_job(&"c".repeat(52)).name_regex();
        assert!(matches(
            &re,
            &format!("{}-28000000-1-abcde", "c".repeat(46))
        ));
        let re = PodNames::deployment("web").name_regex();
        assert!(matches(&re, "web-5d8f7c9b4-x2x7z"));
        assert!(!matches(&re, "web-5d8f7c9b4-x2x7"));
        assert!(!matches(&re, "web2-5d8f7c9b4-x2x7z"));
        assert!(!matches(&re, "xweb-5d8f7c9b4-x2x7z"));
    }

    #[test]
    fn metacharacters_are_escaped() {
        let re = PodNames::pod("a.b").name_regex();
        assert!(matches(&re, "a.b"));
        assert!(!matches(&re, "axb"));
    }

    #[test]
    fn long_bases_are_cut_at_58_as_the_api_server_does() {
        // A 50-character Deployment: base "<50>-<hash>-" is 52..=62 bytes.
        let name = "d".repeat(50);
        let re = PodNames::deployment(&name).name_regex();
        // Hash of 10: base cut to 58 = name + "-" + 7 hash chars.
        let pod = format!("{name}-abcdefg{}", "zzzzz");
        assert_eq!(pod.len(), 63);
        assert!(matches(&re, &pod), "{re}");
        // Hash of 3: no cut.
        assert!(matches(&re, &format!("{name}-abc-zzzzz")));
        // Hash of 7 uncut ends with "-": "<50>-abcdefg-" is 59 → cut to 58, no dash.
        assert!(!matches(&re, &format!("{name}-abcdefg-zzzzz")));
        // A 70-character name: only its first 58 characters remain.
        let long = "e".repeat(70);
        let re = PodNames::deployment(&long).name_regex();
        assert_eq!(re, format!("^{}[a-z0-9]{{5}}$", "e".repeat(58)));
        let re = PodNames::replica_set(&long).name_regex();
        assert_eq!(re, format!("^{}[a-z0-9]{{5}}$", "e".repeat(58)));
    }

    #[test]
    fn host_names_are_cut_at_63_and_trimmed() {
        assert_eq!(PodNames::pod("web").hostname_body(), "web");
        let name = format!("{}-x", "a".repeat(62));
        assert_eq!(PodNames::pod(&name).hostname_body(), "a".repeat(62));
        let sts = PodNames::stateful_set(&"s".repeat(60));
        let re = format!("^{}$", sts.hostname_body());
        assert!(matches(&re, &format!("{}-1", "s".repeat(60))));
        assert!(matches(&re, &format!("{}-12", "s".repeat(60))));
        assert!(!matches(&re, &format!("{}-123", "s".repeat(60))));
        // "<62>-<ordinal>" is cut to "<62>-", and the dash trimmed.
        let sts = PodNames::stateful_set(&"s".repeat(62));
        assert_eq!(sts.hostname_body(), "s".repeat(62));
        // Generated names are at most 63 already.
        assert_eq!(
            PodNames::deployment("web").hostname_body(),
            "web-[a-z0-9]{1,10}-[a-z0-9]{5}"
        );
    }
}
