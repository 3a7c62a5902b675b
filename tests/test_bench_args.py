"""The benchmark scripts refuse bad arguments with a usage error (exit status 2) before
measuring anything: ``--steps -1`` wrote negative throughputs, ``--batch 0`` was read as
"not given", ``--device cuda`` on a machine without one and ``--out`` naming a file gave
tracebacks (the latter after the first measurement), and ``kernel_proxies.py`` ran its
default table for any unknown flag."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import bench_calibration, bench_training, bench_tsra, kernel_proxies  # noqa: E402

needs_no_cuda = pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks the no-CUDA message")


@pytest.mark.parametrize("main, argv, message", [
    (bench_tsra.main, ["--batch", "0"], "--batch: expected an integer >= 1"),
    (bench_tsra.main, ["--batch", "-1"], "--batch: expected an integer >= 1"),
    (bench_tsra.main, ["--device", "foo"], "--device: expected auto, cpu, cuda or cuda:N"),
    (bench_training.main, ["--steps", "-1"], "--steps: expected an integer >= 1"),
    (bench_training.main, ["--steps", "0"], "--steps: expected an integer >= 1"),
    (bench_training.main, ["--batch", "-3"], "--batch: expected an integer >= 1"),
    (bench_training.main, ["--width", "0"], "--width: expected a finite number > 0"),
    (bench_training.main, ["--warmup", "-1"], "--warmup: expected an integer >= 0"),
    (bench_training.main, ["--device", "foo"], "--device: expected auto, cpu"),
    (bench_calibration.main, ["--batch", "0"], "--batch: expected an integer >= 1"),
    (bench_calibration.main, ["--images", "-5"], "--images: expected an integer >= 1"),
    (bench_calibration.main, ["--width", "nan"], "--width: expected a finite number > 0"),
    (bench_calibration.main, ["--repeats", "0"], "--repeats: expected an integer >= 1"),
    (kernel_proxies.cli, ["--covarience"], "unrecognized arguments: --covarience"),
    (kernel_proxies.cli, ["--vec", "--nhwc"], "not allowed with argument"),
])
def test_bad_arguments_are_usage_errors(main, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("main", [bench_tsra.main, bench_calibration.main])
def test_out_naming_a_file_is_refused_before_measuring(main, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(SystemExit) as e:
        main(["--out", str(f)])
    assert e.value.code == 2 and "exists and is not a folder" in capsys.readouterr().err


def test_training_out_stem_in_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(SystemExit) as e:
        bench_training.main(["--out", str(f / "stem")])
    assert e.value.code == 2 and "exists and is not a folder" in capsys.readouterr().err


@needs_no_cuda
@pytest.mark.parametrize("main", [bench_tsra.main, bench_training.main])
def test_cuda_without_a_gpu_is_named(main, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--device", "cuda"])
    assert e.value.code == 2 and "no CUDA device" in capsys.readouterr().err
