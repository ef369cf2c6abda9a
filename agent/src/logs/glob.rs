//! Path globs as operators write them for log files: `*` and `?` within one path component
//! (`/var/log/pods/ingress-nginx_*/controller/*.log`). No `**`, no character classes: enough
//! for log paths, and small enough to read.

use std::{
    fs, io,
    path::{Component, Path, PathBuf},
};

pub fn has_magic(p: &str) -> bool {
    p.contains(['*', '?'])
}

/// Whether `name` matches `pat` (`*`: any run, `?`: one char). Iterative with one backtrack
/// point, so it is linear-ish and never recurses.
pub fn matches(pat: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pat.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Existing paths that match `pattern` (absolute), sorted. Hidden entries only match a
/// pattern component that itself starts with `.`. A literal pattern yields itself if it exists.
pub fn expand(pattern: &str) -> io::Result<Vec<PathBuf>> {
    if !has_magic(pattern) {
        let p = PathBuf::from(pattern);
        return match fs::metadata(&p) {
            Ok(_) => Ok(vec![p]),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        };
    }
    let mut current = vec![PathBuf::from("/")];
    for comp in Path::new(pattern).components() {
        let part = match comp {
            Component::RootDir | Component::CurDir => continue,
            Component::Normal(s) => s.to_string_lossy().into_owned(),
            Component::ParentDir => "..".into(),
            Component::Prefix(_) => continue,
        };
        let mut next = Vec::new();
        for dir in &current {
            if !has_magic(&part) {
                let p = dir.join(&part);
                if fs::symlink_metadata(&p).is_ok() {
                    next.push(p);
                }
                continue;
            }
            let entries = match fs::read_dir(dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) if e.kind() == io::ErrorKind::NotADirectory => continue,
                Err(e) => return Err(e),
            };
            for entry in entries {
                let name = entry?.file_name();
                let name = name.to_string_lossy();
                if name.starts_with('.') && !part.starts_with('.') {
                    continue;
                }
                if matches(&part, &name) {
                    next.push(dir.join(name.as_ref()));
                }
            }
        }
        current = next;
        if current.is_empty() {
            break;
        }
    }
    current.sort();
    Ok(current)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_matching() {
        assert!(matches("*.log", "access.log"));
        assert!(!matches("*.log", "access.log.1"));
        assert!(matches("access.log*", "access.log.1"));
        assert!(matches("a?c", "abc") && !matches("a?c", "abbc"));
        assert!(matches("*", "") && matches("**", "x"));
        assert!(matches("ingress-nginx_*_*", "ingress-nginx_ns_uid"));
        assert!(!matches("x*y*z", "xyyyy"));
        assert!(matches("é*", "éa"));
    }

    #[test]
    fn expands_in_any_component() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        for p in [
            "pods/a_1/c/0.log",
            "pods/a_2/c/0.log",
            "pods/b_1/c/0.log",
            "pods/a_3/c/x.txt",
        ] {
            let f = root.join(p);
            fs::create_dir_all(f.parent().unwrap()).unwrap();
            fs::write(&f, "").unwrap();
        }
        fs::write(root.join("pods/.hidden.log"), "").unwrap();
        let pat = format!("{}/pods/a_*/c/*.log", root.display());
        let got = expand(&pat).unwrap();
        assert_eq!(
            got,
            vec![root.join("pods/a_1/c/0.log"), root.join("pods/a_2/c/0.log")]
        );
        assert!(
            expand(&format!("{}/pods/*.log", root.display()))
                .unwrap()
                .is_empty()
        );
        assert!(
            expand(&format!("{}/nope/*.log", root.display()))
                .unwrap()
                .is_empty()
        );
        let lit = root.join("pods/b_1/c/0.log");
        assert_eq!(expand(lit.to_str().unwrap()).unwrap(), vec![lit.clone()]);
        assert!(
            expand(&format!("{}/missing.log", root.display()))
                .unwrap()
                .is_empty()
        );
    }
}
