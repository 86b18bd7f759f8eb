"""Tests of bench.py: its tables run the real code and report what they claim. CPU, tiny sizes."""

import argparse
import json

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
