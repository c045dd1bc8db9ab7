"""Checksums of a checkpoint's files: who sums what, how verification is shared, what it finds."""

from __future__ import annotations

from pathlib import Path

import xxhash

from trainer.checkpoint.checksums import checkpoint_files, file_checksum, share_of, sum_files, verify_files, written_by


def test_each_shard_is_summed_by_the_rank_that_wrote_it():
    assert written_by("dcp/__0_0.distcp", 4) == 0
    assert written_by("dcp/__3_1.distcp", 4) == 3
    assert written_by("deepspeed/zero_pp_rank_2_mp_rank_00_optim_states.pt", 4) == 2
    assert written_by("deepspeed/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", 4) == 1
    for rank0 in ("dcp/.metadata", "deepspeed/mp_rank_00_model_states.pt", "latest", "trainer_state.json",
                  "tokenizer/tokenizer.json", "dcp/__9_0.distcp"):  # a rank beyond the world: rank 0 sums it
        assert written_by(rank0, 4) == 0, rank0


def test_the_verification_is_shared_out_by_size_the_same_on_every_rank():
    files = {f"f{i}": {"size": size, "checksum": ""} for i, size in enumerate([100, 90, 50, 40, 30, 5])}
    shares = [share_of(files, rank, 3) for rank in range(3)]
    assert sorted(sum(shares, [])) == sorted(files)
    loads = [sum(files[name]["size"] for name in share) for share in shares]
    assert max(loads) - min(loads) <= 40
    assert share_of(files, 0, 1) == sorted(files, key=lambda n: -files[n]["size"])


def test_checksum_is_xxh3_128_of_the_whole_file(tmp_path):
    data = bytes(range(256)) * 70_000  # several reads of the buffer
    (tmp_path / "a").write_bytes(data)
    assert file_checksum(tmp_path / "a") == (len(data), xxhash.xxh3_128(data).hexdigest())


def test_verification_names_the_file_that_changed(tmp_path):
    for name, text in [("a.bin", "alpha" * 1000), ("sub/b.bin", "beta" * 1000)]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    files = sum_files(tmp_path, checkpoint_files(tmp_path))
    assert sorted(files) == ["a.bin", "sub/b.bin"]
    assert verify_files(tmp_path, files) is None

    data = bytearray((tmp_path / "sub/b.bin").read_bytes())
    data[1000] ^= 0xFF  # same size, one byte different
    (tmp_path / "sub/b.bin").write_bytes(bytes(data))
    assert verify_files(tmp_path, files) == "sub/b.bin does not match its checksum"
    assert verify_files(tmp_path, files, ["a.bin"]) is None  # another rank's share
    (tmp_path / "a.bin").write_text("alpha")
    assert verify_files(tmp_path, files) == "a.bin has 5 bytes, its checksum entry 5,000"
    Path(tmp_path / "a.bin").unlink()
    assert verify_files(tmp_path, files) == "a.bin is missing"
