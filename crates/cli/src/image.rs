//! `coffer image …`: pull images into a root filesystem.

use std::{path::PathBuf, sync::Arc};

use anyhow::Context;
use clap::{Args, Subcommand};
use coffer_image::{
    pull::Progress,
    source::{AuthFile, SourceOptions},
    unpack::Limits,
    ImageRef, PullOptions,
};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// `coffer image` arguments.
#[derive(Args)]
pub struct ImageArgs {
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Pull an image (docker://REG/REPO:TAG or oci:DIR[:TAG]) into a new root filesystem.
    Pull(PullArgs),
}

#[derive(Args)]
struct PullArgs {
    /// The image: docker://REGISTRY/REPOSITORY:TAG (or @sha256:…) or oci:DIRECTORY[:TAG].
    image: String,
    /// The root filesystem to create (must not exist, or be empty).
    #[arg(long)]
    rootfs: PathBuf,
    /// Talk to the registry over plain HTTP instead of HTTPS.
    #[arg(long)]
    plain_http: bool,
    /// Registry credentials in the containers auth.json format.
    #[arg(long)]
    authfile: Option<PathBuf>,
    /// Keep verified blobs in this content-addressed cache.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Platform to pick from an image index.
    #[arg(long, default_value = "linux/amd64")]
    platform: String,
    /// Most entries in all layers.
    #[arg(long, default_value_t = Limits::default().max_entries)]
    max_entries: u64,
    /// Most bytes of file content in all layers.
    #[arg(long, default_value_t = Limits::default().max_bytes)]
    max_bytes: u64,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

/// Progress bars: one per layer, on stderr.
struct Bars {
    multi: MultiProgress,
    bars: std::sync::Mutex<Vec<ProgressBar>>,
}

impl Progress for Bars {
    fn layers(&self, layers: &[(String, u64)]) {
        let style = ProgressStyle::with_template("{prefix:.bold} {msg:12} {bytes:>10}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        let mut bars = self.bars.lock().unwrap_or_else(|p| p.into_inner());
        for (digest, size) in layers {
            let bar = self.multi.add(ProgressBar::new(*size));
            bar.set_style(style.clone());
            bar.set_prefix(digest.chars().take(19).collect::<String>());
            bar.set_message("fetching");
            bar.set_position(0);
            bars.push(bar);
        }
    }

    fn fetched(&self, index: usize, from_cache: bool) {
        if let Some(b) = self
            .bars
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(index)
        {
            b.set_position(b.length().unwrap_or(0));
            b.set_message(if from_cache { "cached" } else { "fetched" });
        }
    }

    fn applied(&self, index: usize) {
        if let Some(b) = self
            .bars
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(index)
        {
            b.finish_with_message("applied");
        }
    }
}

/// Runs `coffer image …`.
pub async fn run(args: ImageArgs) -> anyhow::Result<()> {
    match args.command {
        ImageCommand::Pull(a) => pull(a).await,
    }
}

async fn pull(a: PullArgs) -> anyhow::Result<()> {
    let image = ImageRef::parse(&a.image)?;
    let auth = match &a.authfile {
        Some(p) => AuthFile::parse(
            &std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
        )?,
        None => AuthFile::default(),
    };
    let progress: Option<Arc<dyn Progress>> = if a.quiet {
        None
    } else {
        Some(Arc::new(Bars {
            multi: MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::stderr()),
            bars: Default::default(),
        }))
    };
    let opts = PullOptions {
        source: SourceOptions {
            plain_http: a.plain_http,
            auth,
        },
        platform: a.platform.parse()?,
        cache_dir: a.cache_dir,
        limits: Limits {
            max_entries: a.max_entries,
            max_bytes: a.max_bytes,
        },
        concurrency: 3,
        progress,
    };
    let report = coffer_image::pull(&image, &a.rootfs, &opts)
        .await
        .with_context(|| format!("cannot pull {image}"))?;
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "image": image.to_string(),
            "manifest_digest": report.manifest_digest,
            "index_digest": report.index_digest,
            "config_digest": report.config_digest,
            "layers": report.layers,
            "cached_layers": report.cached_layers,
            "entries": report.totals.entries,
            "bytes": report.totals.bytes,
            "rootfs": a.rootfs,
        }))?
    );
    Ok(())
}
