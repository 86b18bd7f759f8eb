"""Tests of bench.py: its tables run the real code and report what they claim. CPU, tiny sizes."""

import argparse
import json

import pytest
import torch

import bench
import data

torch.set_num_threads(1)


def test_train_table_times_the_real_step_and_counts_operators(tmp_path):
    rows = bench.main(['train', '--img-size', '32', '--warmup', '1', '--steps', '1', '--modes', 'eager', '--out',
                       str(tmp_path)])['train']
    step, added = rows
    assert step['model'] == 'DANIE-S' and step['img_s'] > 0 and step['mode'] == 'eager' and step['ready_s'] > 0
    # what DANIE adds to its backbone is counted, and is far more than nothing
    assert added['added'] == added['danie'] - added['backbone'] and added['backbone'] > 1000
    assert step['operators'] > added['danie'] > added['added'] > 500  # train_step also holds the AdamW step
    assert json.loads((tmp_path / 'bench-train.json').read_text()) == rows


def test_dynamo_traces_danie_without_a_graph_break_in_its_own_files():
    breaks, ours, reasons = bench.graph_breaks('S', argparse.Namespace(img_size=32))
    assert ours == 0, reasons
    assert breaks >= ours


def test_model_and_data_tables(tmp_path, capsys):
    rows = bench.main(['model', 'data', '--img-size', '32', '--warmup', '0', '--steps', '1', '--root',
                       str(tmp_path / 'demo'), '--images', '2', '--workers', '0'])
    s, l = rows['model']
    assert s['params_m'] == sum(p.numel() for p in bench.danie.danie('S', img_size=32).parameters()) / 1e6
    assert l['gmac'] > s['gmac'] > s['bb_gmac'] > 0 and s['ms'] > 0 and s['bb_ms'] > 0
    first, second = rows['data']
    assert first['samples'] == second['samples'] == 16 and second['samples_s'] > 0
    assert (tmp_path / 'demo' / data.DEMO_MARK).is_file() and 'DANIE-S' in capsys.readouterr().out


def test_profile_ranks_the_step_by_time_and_by_count(capsys):
    rows = bench.main(['profile', '--img-size', '32', '--warmup', '0', '--top', '3'])['profile']
    by_time, by_count = [r for r in rows if r['by'] == 'time'], [r for r in rows if r['by'] == 'count']
    assert len(by_time) == len(by_count) == 3
    assert [r['ms'] for r in by_time] == sorted((r['ms'] for r in by_time), reverse=True) and by_time[0]['ms'] > 0
    assert [r['calls'] for r in by_count] == sorted((r['calls'] for r in by_count), reverse=True)
    assert by_count[0]['calls'] > by_time[0]['calls']  # the most frequent are not the costliest (convolutions)
    assert 0 < sum(r['share'] for r in by_time) <= 1 and 'operators' in capsys.readouterr().out


def test_train_grid_picks_the_configurations(capsys):
    rows = bench.main(['train', '--img-size', '32', '--warmup', '0', '--steps', '1', '--modes', 'eager', '--grid',
                       'S:bf16:3'])['train']
    assert (rows[0]['model'], rows[0]['amp'], rows[0]['batch']) == ('DANIE-S', 'bf16', 3)
    assert bench.grid_arg('L:none:24') == ('L', 'none', 24)
    for bad in ('X:none:2', 'S:fp8:2', 'S:bf16', 'S:bf16:0'):
        with pytest.raises(argparse.ArgumentTypeError, match='SIZE:AMP:BATCH'):
            bench.grid_arg(bad)
