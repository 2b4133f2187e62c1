//! Output files of the one-shot commands (`replay`, `sae-score`): the check, made before
//! anything is written, that each output's folder exists and that no output would
//! overwrite one of the command's inputs, another output, or a file of the model it reads.
//!
//! Fed by the commands' paths; a refusal is an [`OutputClash`] naming the output, the flag
//! that named it and what it would have destroyed (`replay --out same.csv` of `--input
//! same.csv` once truncated the recording; `sae-score --out` onto the SAE's `cfg.json` left
//! the SAE unusable).

use std::path::{Path, PathBuf};

/// An output that would overwrite something it must not.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", .path.display())]
pub struct OutputClash {
    /// The output as given.
    pub path: PathBuf,
    /// `AlreadyExists`, with `"<flag> would overwrite <what>; choose another file"`.
    pub source: std::io::Error,
}

/// What an output must not overwrite.
#[derive(Debug, Clone, Copy)]
pub enum Protected<'a> {
    /// The file given with this flag (an input): `("--input", path)`.
    File(&'a str, &'a Path),
    /// Any file in this folder or below it; `what` names it (`"a file of the SAE folder"`).
    Folder { what: &'a str, dir: &'a Path },
    /// The files directly in `dir` whose lower-case name `is_own` accepts: a model folder's
    /// own files, beside which other files may be written.
    OwnFiles {
        what: &'a str,
        dir: &'a Path,
        is_own: fn(&str) -> bool,
    },
}

/// Where `path` lives once resolved (links followed): itself when it exists, else its
/// resolved folder joined with its name; `None` when neither resolves.
pub fn resolved(path: &Path) -> Option<PathBuf> {
    if let Ok(p) = path.canonicalize() {
        return Some(p);
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    let parent = parent.unwrap_or(Path::new(".")).canonicalize().ok()?;
    Some(parent.join(path.file_name()?))
}

/// Refuses an output (`(flag, path)`, `None` when not asked for) whose folder does not
/// exist, or that is one of the `protected` files or inside a protected folder, or that is another output by any
/// spelling. Outputs that exist but are not regular files (`/dev/null`) are left alone.
///
/// # Errors
/// The first [`OutputClash`], in the order of `outputs`.
pub fn check(
    outputs: &[(&str, Option<&Path>)],
    protected: &[Protected<'_>],
) -> Result<(), OutputClash> {
    let protected: Vec<(Protected<'_>, Option<PathBuf>)> = protected
        .iter()
        .map(|p| {
            let path = match p {
                Protected::File(_, path) => path,
                Protected::Folder { dir, .. } | Protected::OwnFiles { dir, .. } => dir,
            };
            (*p, resolved(path))
        })
        .collect();
    let mut taken: Vec<(&str, PathBuf)> = Vec::new();
    for &(flag, path) in outputs {
        let Some(path) = path else { continue };
        if path.exists() && !path.is_file() {
            continue;
        }
        // Said here, before any work, rather than as "(os error 2)" when it is created.
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(parent) = parent
            && !parent.is_dir()
        {
            let what = if parent.exists() {
                "is not a folder"
            } else {
                "does not exist"
            };
            return Err(OutputClash {
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "{flag}: the folder {} {what}; create it first, or choose another path",
                        parent.display()
                    ),
                ),
            });
        }
        let Some(out) = resolved(path) else { continue };
        let clash = |what: &str| OutputClash {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{flag} would overwrite {what}; choose another file"),
            ),
        };
        for (p, at) in &protected {
            let Some(at) = at else { continue };
            match *p {
                Protected::File(other, _) if *at == out => {
                    return Err(clash(&format!("the {other} file")));
                }
                // A file not there yet is not overwritten: say it would be added.
                Protected::Folder { what, .. } if out.starts_with(at) && !path.exists() => {
                    let folder = what
                        .strip_prefix("a file of ")
                        .or_else(|| what.strip_prefix("a file in "))
                        .unwrap_or(what);
                    return Err(OutputClash {
                        path: path.to_path_buf(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::AlreadyExists,
                            format!(
                                "{flag} would write a new file into {folder}, which this \
                                 command must leave as it is; choose another file"
                            ),
                        ),
                    });
                }
                Protected::Folder { what, .. } if out.starts_with(at) => return Err(clash(what)),
                Protected::OwnFiles { what, is_own, .. }
                    if Some(at.as_path()) == out.parent()
                        && out
                            .file_name()
                            .is_some_and(|n| is_own(&n.to_string_lossy().to_lowercase())) =>
                {
                    return Err(clash(what));
                }
                _ => {}
            }
        }
        if let Some((other, _)) = taken.iter().find(|(_, p)| *p == out) {
            return Err(clash(&format!("the {other} output")));
        }
        taken.push((flag, out));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(outputs: &[(&str, Option<&Path>)], protected: &[Protected<'_>]) -> String {
        check(outputs, protected).unwrap_err().to_string()
    }

    /// `replay --out missing/s.csv` failed after the replay with a bare "(os error 2)".
    #[test]
    fn an_output_in_a_folder_that_does_not_exist_names_the_flag_and_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let out = d.join("missing/s.csv");
        assert_eq!(
            refusal(&[("--events", Some(&out))], &[]),
            format!(
                "{}: --events: the folder {} does not exist; create it first, or choose another path",
                out.display(),
                d.join("missing").display()
            )
        );
        std::fs::write(d.join("afile"), b"x").unwrap();
        let out = d.join("afile/s.csv");
        assert!(
            refusal(&[("--out", Some(&out))], &[]).contains("--out: the folder")
                && refusal(&[("--out", Some(&out))], &[]).contains("afile is not a folder"),
        );
        // A bare name is in the current folder, which exists.
        assert!(check(&[("--out", Some(Path::new("s.csv")))], &[]).is_ok());
    }

    #[test]
    fn refuses_inputs_folders_own_files_and_twice_the_same_output() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (input, model, sae) = (d.join("in.npy"), d.join("model"), d.join("sae"));
        std::fs::create_dir_all(sae.join("dark")).unwrap();
        std::fs::create_dir_all(&model).unwrap();
        std::fs::write(&input, b"x").unwrap();
        let protected = [
            Protected::File("--input", &input),
            Protected::Folder {
                what: "a file of the SAE folder",
                dir: &sae,
            },
            Protected::OwnFiles {
                what: "a file of the model folder",
                dir: &model,
                is_own: |n| n == "model.json",
            },
        ];
        let e = refusal(&[("--out", Some(&d.join("./in.npy")))], &protected);
        assert!(
            e.ends_with("in.npy: --out would overwrite the --input file; choose another file"),
            "{e}"
        );
        // Inside the folder at any depth, whether the file exists or not.
        // A new file is said to be added, not overwritten (the file is not there).
        let e = refusal(&[("--out", Some(&sae.join("dark/new.csv")))], &protected);
        assert!(
            e.contains("--out would write a new file into the SAE folder, which")
                && e.ends_with("choose another file"),
            "{e}"
        );
        std::fs::write(sae.join("dark/old.csv"), b"x").unwrap();
        let e = refusal(&[("--out", Some(&sae.join("dark/old.csv")))], &protected);
        assert!(
            e.contains("--out would overwrite a file of the SAE folder"),
            "{e}"
        );
        let e = refusal(&[("--out", Some(&model.join("Model.JSON")))], &protected);
        assert!(e.contains("a file of the model folder"), "{e}");
        let e = refusal(
            &[
                ("--out", Some(&d.join("a.csv"))),
                ("--prompt-out", Some(&d.join("sae/../a.csv"))),
            ],
            &protected,
        );
        assert!(
            e.contains("--prompt-out would overwrite the --out output"),
            "{e}"
        );
        // Other files beside a model, new files elsewhere and devices are fine.
        let fine = [
            ("--out", Some(model.join("scores.csv"))),
            ("--events", Some(d.join("new.csv"))),
            ("--plot", Some(PathBuf::from("/dev/null"))),
            ("--prompt-out", None),
        ];
        let fine: Vec<(&str, Option<&Path>)> =
            fine.iter().map(|(f, p)| (*f, p.as_deref())).collect();
        check(&fine, &protected).unwrap();
    }
}
