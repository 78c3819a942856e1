"""tensorflow-datasets private API used by tfds_ms1m, in one place: `GeneratorBasedBuilder._download_and_prepare`.

tfds hands a build's Beam options and runner (`DownloadConfig.beam_options` / `beam_runner`) to no
public hook, so `BeamAwareBuilder` overrides that private method to note whether they were given;
tests/test_compat.py pins its parameters and those two fields.
"""
from __future__ import annotations

import tensorflow_datasets as tfds


class BeamAwareBuilder:
    """Builder mixin, listed before `tfds.core.GeneratorBasedBuilder`: `beam_build` is True while a
    build given Beam options or a runner runs, False otherwise."""

    beam_build = False

    def _download_and_prepare(
        self, dl_manager: tfds.download.DownloadManager, download_config: tfds.download.DownloadConfig
    ) -> None:
        """Notes whether Beam options or a runner were given, for the build's split generators."""
        self.beam_build = download_config.beam_options is not None or download_config.beam_runner is not None
        try:
            super()._download_and_prepare(dl_manager, download_config)
        finally:
            self.beam_build = False
