//! `keyward backup` and `keyward restore`: an online, consistent backup of a
//! running sidecar's keys (the `Backup` RPC, [`crate::keys::snapshot`]),
//! and a new data directory made from one.
//!
//! Neither ever leaves something that looks complete and is not: a backup
//! is written under a temporary name, checked whole, then renamed; a
//! restore checks the whole file before it writes anything, writes the
//! store under a temporary name, and removes what it wrote if anything
//! fails.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufReader, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::cli::{self, ClientArgs};
use crate::pb::v1 as pb;
use crate::store::backup::{Header, Reader, verify_checksum};
use crate::store::db::{Put, Store};
use crate::store::record::KeyRecord;

/// Records written to a restored store per transaction.
const RESTORE_BATCH: usize = 1024;
/// The name a restore builds the store under, inside the data directory.
const RESTORING: &str = ".db.restoring";

/// `keyward backup` arguments.
#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// Where to write the backup (`-`: stdout). Written under a temporary
    /// name beside it and renamed once complete and checked.
    #[arg(long)]
    pub out: PathBuf,

    /// The server and the credential (the admin token).
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `keyward restore` arguments.
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The data directory to create the store in: absent or empty.
    #[arg(long, env = "KEYWARD_DATA_DIR")]
    pub data_dir: PathBuf,

    /// The backup file (from `keyward backup`).
    pub file: PathBuf,
}

/// Takes a backup from a running sidecar and writes it to `args.out`.
pub async fn backup(args: BackupArgs) -> anyhow::Result<()> {
    let (mut client, bearer) = cli::connect(&args.client).await?;
    let mut stream = client
        .backup(cli::authed(&bearer, pb::BackupRequest {}))
        .await?
        .into_inner();
    if args.out == Path::new("-") {
        // Checked by whoever reads it (`keyward restore` checks all of it).
        while let Some(chunk) = stream.message().await? {
            std::io::stdout()
                .write_all(&chunk.data)
                .context("writing the backup to stdout")?;
        }
        std::io::stdout()
            .flush()
            .context("writing the backup to stdout")?;
        return Ok(());
    }
    let mut partial = Partial::create(&args.out)?;
    while let Some(chunk) = stream.message().await? {
        partial
            .file
            .write_all(&chunk.data)
            .context("writing the backup")?;
    }
    partial.file.sync_all().context("writing the backup")?;
    let header = verify(&partial.path)
        .context("the backup received does not check out; nothing was written")?;
    partial.persist(&args.out)?;
    println!(
        "backed up {} keys to {} ({})",
        header.keys,
        args.out.display(),
        describe(&header)
    );
    Ok(())
}

/// Creates a data directory from a backup file.
pub fn restore(args: &RestoreArgs) -> anyhow::Result<()> {
    let dir = &args.data_dir;
    let existed = match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if let Some(entry) = entries.next() {
                let name = entry
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .unwrap_or_default();
                bail!(
                    "{} is not empty (it holds {name}): restore into an absent or empty directory",
                    dir.display()
                );
            }
            true
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => false,
        Err(error) => return Err(error).with_context(|| format!("reading {}", dir.display())),
    };
    let header = verify(&args.file)?;
    let written = write_store(dir, &args.file, &header);
    if let Err(error) = written {
        // Leave the directory as it was: absent, or empty.
        let _ = std::fs::remove_dir_all(dir.join(RESTORING));
        let _ = std::fs::remove_dir_all(dir.join("db"));
        if !existed {
            let _ = std::fs::remove_dir_all(dir);
        }
        return Err(error.context("restore failed; nothing was left in the data directory"));
    }
    println!(
        "restored {} keys into {} ({}); start `keyward serve --data-dir {}`",
        header.keys,
        dir.display(),
        describe(&header),
        dir.display()
    );
    Ok(())
}

/// Checks a whole backup file: format, checksum, every entry, the count,
/// no key twice. Its header.
fn verify(path: &Path) -> anyhow::Result<Header> {
    let at = || path.display().to_string();
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    verify_checksum(&mut file).with_context(at)?;
    let mut reader = Reader::open(BufReader::new(file)).with_context(at)?;
    let mut seen = HashSet::new();
    while let Some(entry) = reader.next_entry().with_context(at)? {
        if !seen.insert(entry.record.id) {
            bail!("{}: key {} appears twice", at(), entry.record.id);
        }
    }
    Ok(reader.header().clone())
}

/// Writes the store under a temporary name in `dir`, then renames it into
/// place and opens it again to count its keys.
fn write_store(dir: &Path, path: &Path, header: &Header) -> anyhow::Result<()> {
    create_private_dir(dir)?;
    let staging = dir.join(RESTORING);
    {
        let store = Store::open(&staging)
            .with_context(|| format!("creating a store in {}", staging.display()))?;
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut reader = Reader::open(BufReader::new(file))?;
        let mut batch: Vec<KeyRecord> = Vec::with_capacity(RESTORE_BATCH);
        let mut used = Vec::new();
        loop {
            let entry = reader.next_entry()?;
            let end = entry.is_none();
            if let Some(entry) = entry {
                if entry.last_used != 0 {
                    used.push((entry.record.id, entry.last_used));
                }
                batch.push(entry.record);
            }
            if batch.len() == RESTORE_BATCH || (end && !batch.is_empty()) {
                let puts = store.put_all(&batch.iter().collect::<Vec<_>>())?;
                if puts.iter().any(|put| *put != Put::Created) {
                    bail!("the backup holds a key twice");
                }
                batch.clear();
            }
            if end {
                break;
            }
        }
        store.record_last_used(&used)?;
        store.flush()?;
    }
    let target = dir.join("db");
    std::fs::rename(&staging, &target)
        .with_context(|| format!("renaming {} to {}", staging.display(), target.display()))?;
    sync_dir(dir)?;
    let restored = Store::open(&target)?.len() as u64;
    if restored != header.keys {
        bail!(
            "the restored store holds {restored} keys where the backup holds {}",
            header.keys
        );
    }
    Ok(())
}

/// The header as a person reads it.
fn describe(header: &Header) -> String {
    let hex = header
        .catalog_sha256
        .iter()
        .take(6)
        .fold(String::new(), |mut hex, byte| {
            let _ = write!(hex, "{byte:02x}");
            hex
        });
    let taken = std::time::UNIX_EPOCH
        + std::time::Duration::from_nanos(u64::try_from(header.taken_at_unix_nanos).unwrap_or(0));
    let source = if header.source == "etcd" {
        format!("etcd at revision {}", header.etcd_revision)
    } else {
        header.source.clone()
    };
    format!(
        "taken {} from {source}, catalog {} sha256 {hex}…, keyward {}",
        humantime::format_rfc3339_seconds(taken),
        header.catalog_source,
        header.keyward_version
    )
}

/// A backup being received: a temporary file beside the target, removed
/// unless it is renamed into place.
struct Partial {
    path: PathBuf,
    file: File,
    kept: bool,
}

impl Partial {
    fn create(out: &Path) -> anyhow::Result<Self> {
        let name = out
            .file_name()
            .with_context(|| format!("--out {} names no file", out.display()))?;
        let mut partial = name.to_os_string();
        partial.push(format!(".partial-{}", std::process::id()));
        let path = out.with_file_name(partial);
        // Owner-only, like the store it copies: it holds every key's hash,
        // name, account and allowlist.
        let file = std::os::unix::fs::OpenOptionsExt::mode(
            std::fs::OpenOptions::new().write(true).create_new(true),
            0o600,
        )
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
        Ok(Self {
            path,
            file,
            kept: false,
        })
    }

    /// Renames the checked file into place, durably.
    fn persist(mut self, out: &Path) -> anyhow::Result<()> {
        std::fs::rename(&self.path, out)
            .with_context(|| format!("renaming {} to {}", self.path.display(), out.display()))?;
        self.kept = true;
        match out.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
            _ => sync_dir(Path::new(".")),
        }
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Makes a rename in `dir` durable.
fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}
