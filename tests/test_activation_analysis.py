"""The activation-analysis tool: its measurements, files and command line."""

import json

import numpy as np
import pytest

from ifsq_jax.tools import activation_analysis as aa


def test_measured_occupancy_matches_the_gaussian_cdf_through_the_inverse_bound():
  samples = 2**18
  for bound in (aa.Bound("FSQ tanh", "tanh"), aa.Bound("iFSQ", "ifsq", 1.6), aa.Bound("iFSQ", "ifsq", 1.1)):
    for levels in (5, 8, 17):
      rows = aa.measure(bound, levels, (0.5, 1.0, 3.0), samples, seed=1)
      for row in rows:
        p = np.asarray(row["occupancy"])
        expected = aa.expected_occupancy(bound, levels, row["std"])
        assert p.shape == (levels,) and abs(p.sum() - 1) < 1e-9
        # Binomial standard error of a bin share, 5 sigma.
        tol = 5 * np.sqrt(expected * (1 - expected) / samples) + 1e-6
        assert np.all(np.abs(p - expected) <= tol), (bound, levels, row["std"], p, expected)
        assert row["entropy_bits"] <= np.log2(levels) + 1e-9
        np.testing.assert_allclose(row["edge_share"], p[0] + p[-1])


def test_alpha_and_input_scale_trade_exactly():
  # iFSQ with slope a on inputs of std 2s sees exactly what slope 2a sees at std s.
  a = aa.measure(aa.Bound("x", "ifsq", 1.6), 17, (2.0,), 2**15, seed=3)[0]
  b = aa.measure(aa.Bound("y", "ifsq", 3.2), 17, (1.0,), 2**15, seed=3)[0]
  assert a["occupancy"] == b["occupancy"]


def test_ifsq_is_flatter_than_tanh_at_unit_scale():
  tanh, ifsq = (aa.measure(b, 17, (1.0,), 2**18)[0] for b in (aa.Bound("t", "tanh"), aa.Bound("i", "ifsq")))
  assert ifsq["max_bin_over_uniform"] < tanh["max_bin_over_uniform"]
  assert ifsq["edge_share"] < tanh["edge_share"]


def test_uniform_activation_row_is_the_half_width_edge_ideal():
  row = aa.uniform_activation_row(17)
  np.testing.assert_allclose(sum(row["occupancy"]), 1.0)
  np.testing.assert_allclose(row["edge_share"], 1 / 16)
  np.testing.assert_allclose(row["max_bin_over_uniform"], 17 / 16)


def test_command_writes_table_json_and_png(tmp_path, capsys):
  aa.main(["--out", str(tmp_path), "--samples", "4096"])
  md = (tmp_path / "activation_analysis.md").read_text()
  for level in aa.LEVELS:
    assert f"## L = {level} " in md
  assert md.count("| FSQ tanh |") == 4 * len(aa.LEVELS)
  rows = json.loads((tmp_path / "activation_analysis.json").read_text())
  assert len(rows) == len(aa.LEVELS) * len(aa.STDS) * (1 + len(aa.ALPHAS))
  assert (tmp_path / "activation_analysis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "Wrote" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    aa.main(["--out", str(tmp_path), "--samples", "0"])
