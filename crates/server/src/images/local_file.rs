//! `file://` image URLs: only under the configured directory (checked lexically, then with
//! symlinks resolved), only regular files (a FIFO or device is refused without a blocking
//! open), at most the byte cap.

use super::error::ImageFetchError;
use reqwest::Url;
use std::fs::OpenOptions;
use std::io::{self, Read as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Component, Path, PathBuf};

/// The allowed directory as configured and with symlinks resolved: URL paths are checked
/// against both lexically, and the canonicalized file against the latter.
pub(super) struct LocalDir {
    configured: PathBuf,
    canonical: PathBuf,
}

impl LocalDir {
    /// The directory `configured`, which must exist: a misconfiguration shows at startup
    /// rather than as client errors.
    pub(super) fn new(configured: PathBuf) -> Result<LocalDir, ImageFetchError> {
        let canonical = configured.canonicalize().map_err(|e| {
            ImageFetchError::Config(format!("allowed_local_dir `{}`: {e}", configured.display()))
        })?;
        if !canonical.is_dir() {
            return Err(ImageFetchError::Config(format!(
                "allowed_local_dir `{}` is not a directory",
                configured.display()
            )));
        }
        Ok(LocalDir {
            configured,
            canonical,
        })
    }
}

/// Reads a `file://` URL's file if it lies under the allowed directory once symlinks are
/// resolved. The URL path is first checked lexically (no `..`, under the directory), so that
/// paths elsewhere are refused without touching the filesystem and clients cannot probe which
/// files exist outside the directory. The directory's own contents are the operator's.
pub(super) fn read_local_file(
    dir: &LocalDir,
    url: &Url,
    max_bytes: usize,
) -> Result<Vec<u8>, ImageFetchError> {
    let path = url.to_file_path().map_err(|()| {
        ImageFetchError::InvalidUrl("a file URL must be an absolute path on this server".into())
    })?;
    let under = |root: &Path| path.starts_with(root);
    if path.components().any(|c| c == Component::ParentDir)
        || !(under(&dir.configured) || under(&dir.canonical))
    {
        return Err(ImageFetchError::OutsideLocalDir);
    }
    let canonical = path.canonicalize().map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => ImageFetchError::LocalFileNotFound,
        _ => ImageFetchError::LocalFile(e.to_string()),
    })?;
    if !canonical.starts_with(&dir.canonical) {
        return Err(ImageFetchError::OutsideLocalDir); // a symlink pointing out
    }
    let read_error = |e: io::Error| ImageFetchError::LocalFile(e.to_string());
    let not_regular = || ImageFetchError::LocalFile("not a regular file".into());
    // Opening a FIFO blocks until a writer appears, and a device may never answer: only
    // regular files are opened, and the open itself cannot block (O_NONBLOCK, which reads
    // of regular files ignore). The opened file is checked again, in case the path was
    // replaced between the two.
    if !std::fs::metadata(&canonical).map_err(read_error)?.is_file() {
        return Err(not_regular());
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&canonical)
        .map_err(read_error)?;
    let metadata = file.metadata().map_err(read_error)?;
    if !metadata.is_file() {
        return Err(not_regular());
    }
    if metadata.len() > max_bytes as u64 {
        return Err(ImageFetchError::TooLarge(max_bytes));
    }
    // The file may grow after `metadata`: read at most one byte past the cap to notice.
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    file.take(max_bytes as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() > max_bytes {
        return Err(ImageFetchError::TooLarge(max_bytes));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::{ImageFetchConfig, ImageFetchError, ImageFetcher};
    use super::*;
    use std::time::Duration;

    fn file_url(path: &Path) -> String {
        Url::from_file_path(path).unwrap().to_string()
    }

    #[tokio::test]
    async fn images_file_urls() {
        let root = tempfile::tempdir().unwrap();
        let allowed = root.path().join("allowed");
        let outside = root.path().join("outside");
        std::fs::create_dir_all(allowed.join("sub")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(allowed.join("sub/cat.png"), PNG).unwrap();
        std::fs::write(outside.join("secret.png"), PNG).unwrap();
        std::fs::write(allowed.join("big.png"), [0u8; 100]).unwrap();
        std::os::unix::fs::symlink(outside.join("secret.png"), allowed.join("escape.png")).unwrap();
        std::os::unix::fs::symlink(&outside, allowed.join("escape_dir")).unwrap();
        std::os::unix::fs::symlink(allowed.join("sub/cat.png"), allowed.join("alias.png")).unwrap();

        // Not configured: refused even for the file that would be allowed.
        let err = fetcher(ImageFetchConfig::default())
            .fetch(&file_url(&allowed.join("sub/cat.png")))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "file URLs are not enabled on this server");

        let f = fetcher(ImageFetchConfig {
            max_bytes: 99,
            allowed_local_dir: Some(allowed.clone()),
            ..ImageFetchConfig::default()
        });
        assert_eq!(
            f.fetch(&file_url(&allowed.join("sub/cat.png")))
                .await
                .unwrap(),
            PNG
        );
        assert_eq!(
            f.fetch(&file_url(&allowed.join("alias.png")))
                .await
                .unwrap(),
            PNG
        );
        let base = file_url(&allowed);
        let outside_urls = [
            file_url(&outside.join("secret.png")),
            file_url(&allowed.join("escape.png")),
            file_url(&allowed.join("escape_dir/secret.png")),
            format!("{base}/../outside/secret.png"),
            format!("{base}/sub/%2E%2E/%2E%2E/outside/secret.png"),
            format!("{base}/..%2F..%2Foutside/secret.png"),
            "file:///etc/passwd".to_owned(),
            "file:///nonexistent/x.png".to_owned(),
        ];
        for url in outside_urls {
            let err = f.fetch(&url).await.unwrap_err();
            assert_eq!(
                err.to_string(),
                "image file is outside the allowed directory",
                "{url}"
            );
        }
        let err = f
            .fetch(&file_url(&allowed.join("none.png")))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "image file not found");
        let err = f
            .fetch(&file_url(&allowed.join("big.png")))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "image exceeds 99 bytes");
        let err = f.fetch(&file_url(&allowed.join("sub"))).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "could not read the image file: not a regular file"
        );
        let err = f.fetch("file://otherhost/etc/passwd").await.unwrap_err();
        assert!(matches!(err, ImageFetchError::InvalidUrl(_)), "{err}");
    }

    /// Opening a FIFO for reading blocks until a writer comes, which here is never: the
    /// request must fail at once instead of holding a blocking thread (and the client) forever.
    #[tokio::test]
    async fn images_file_fifo_is_refused_without_blocking() {
        let root = tempfile::tempdir().unwrap();
        let fifo = root.path().join("pipe.png");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates the node.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        std::os::unix::fs::symlink(&fifo, root.path().join("alias.png")).unwrap();
        let f = fetcher(ImageFetchConfig {
            allowed_local_dir: Some(root.path().to_owned()),
            ..ImageFetchConfig::default()
        });
        for name in ["pipe.png", "alias.png"] {
            let url = file_url(&root.path().join(name));
            let err = tokio::time::timeout(Duration::from_secs(5), f.fetch(&url))
                .await
                .unwrap_or_else(|_| panic!("{name}: the read blocked"))
                .unwrap_err();
            assert_eq!(
                err.to_string(),
                "could not read the image file: not a regular file",
                "{name}"
            );
        }
    }

    #[test]
    fn images_bad_local_dir_is_a_config_error() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        for dir in [root.path().join("missing"), file] {
            let result = ImageFetcher::new(ImageFetchConfig {
                allowed_local_dir: Some(dir),
                ..ImageFetchConfig::default()
            });
            assert!(matches!(result, Err(ImageFetchError::Config(_))));
        }
    }
}
