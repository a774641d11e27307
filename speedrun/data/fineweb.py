"""Download the pre-tokenized GPT-2 FineWeb shards that the speedrun record trains on, from the
Hugging Face hub dataset repos published for modded-nanogpt (each train shard holds 100M tokens)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from speedrun.data import shards
from speedrun.errors import DataError, UsageError, first_line
from speedrun.rundir import check_folder, make_folder


@dataclass(frozen=True)
class Dataset:
    repo: str
    prefix: str
    train_shards: int  # how many train shards the repo holds, numbered from 1

    def val_name(self) -> str:
        return f"{self.prefix}_val_{0:06d}.bin"

    def train_name(self, index: int) -> str:
        return f"{self.prefix}_train_{index:06d}.bin"


DATASETS = {
    "fineweb10B": Dataset("kjj0/fineweb10B-gpt2", "fineweb", 103),
    "fineweb100B": Dataset("kjj0/fineweb100B-gpt2", "fineweb", 1030),
    "finewebedu10B": Dataset("kjj0/finewebedu10B-gpt2", "finewebedu", 103),
}
DEFAULT_DATASET = "fineweb10B"
DEFAULT_TRAIN_SHARDS = 8  # 800M tokens: more than the GPT-2 record trains on


def _complete(path: Path) -> bool:
    try:
        shards.read_header(path)
    except DataError:
        return False
    return True


def check_reachable(repo: str, filename: str, revision: str) -> None:
    """One HEAD request without retries, so that an unreachable hub fails in a second with a plain
    message, instead of after huggingface_hub's half-minute of retries and warnings."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    url = hf_hub_url(repo, filename, repo_type="dataset", revision=revision)
    try:
        get_hf_file_metadata(url)
    except HfHubHTTPError as e:
        raise DataError(f"the Hugging Face hub refused {repo}/{filename}: {first_line(e)}") from None
    except Exception as e:
        raise DataError(f"cannot reach the Hugging Face hub at {constants.ENDPOINT} "
                        f"({type(e).__name__}: {first_line(e)}); check the network or HF_ENDPOINT") from None


def download_fineweb(dataset: str = DEFAULT_DATASET, train_shards: int = DEFAULT_TRAIN_SHARDS,
                     out_dir: str | Path | None = None, revision: str = "main", progress: bool = True) -> list[Path]:
    """Fetch the val shard and the first `train_shards` train shards into `out_dir` (default
    data/<dataset>). Files already there whose header matches their length are not fetched again; a
    download the connection drops is resumed from where it stopped by huggingface_hub."""
    if dataset not in DATASETS:
        raise UsageError(f"unknown dataset '{dataset}'; choose one of: {', '.join(DATASETS)}")
    info = DATASETS[dataset]
    if not 0 <= train_shards <= info.train_shards:
        raise UsageError(f"--train-shards must be between 0 and {info.train_shards} for {dataset}, got {train_shards}")
    out = check_folder(Path(out_dir) if out_dir is not None else Path("data") / dataset, "--dir")
    names = [info.val_name()] + [info.train_name(i) for i in range(1, train_shards + 1)]
    missing = [name for name in names if not _complete(out / name)]
    say = print if progress else (lambda *a, **k: None)
    say(f"{dataset}: {len(names) - len(missing)} of {len(names)} shards already in {out}")
    if not missing:
        return [out / name for name in names]

    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars, logging as hub_logging

    check_reachable(info.repo, missing[0], revision)
    make_folder(out, "--dir")
    # Its retry warnings are multi-line; any failure that survives the retries is reported below.
    verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    if not progress:
        disable_progress_bars()
    try:
        for i, name in enumerate(missing, 1):
            say(f"[{i}/{len(missing)}] {info.repo}/{name}")
            sys.stdout.flush()
            # A broken file here would be taken as downloaded if its hub metadata file survived.
            (out / name).unlink(missing_ok=True)
            try:
                hf_hub_download(repo_id=info.repo, filename=name, repo_type="dataset", revision=revision,
                                local_dir=out)
            except KeyboardInterrupt:
                raise
            except Exception as e:
                raise DataError(f"download of {info.repo}/{name} failed ({type(e).__name__}: {first_line(e)})") from None
            try:
                shards.read_header(out / name)
            except DataError as e:
                os.unlink(out / name)
                raise DataError(f"downloaded file is not a valid shard, removed it: {e}") from None
    finally:
        hub_logging.set_verbosity(verbosity)
        if not progress:
            enable_progress_bars()
    return [out / name for name in names]
