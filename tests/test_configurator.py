"""configurator.py: every nanoGPT quirk we fixed, the errors, --help, and the device/dtype helpers."""
import contextlib
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from configurator import autocast_context, autodetect_device, configure, plot_depth_history, require_at_least

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = '''"""Train a tiny model (test script)."""
import os
out_dir = 'out#1'  # where checkpoints go
max_iters = 5000  # total optimizer steps
learning_rate = 6e-4  # peak learning rate
dropout = 0.0
compile = False  # torch.compile the model
decay_lr = True  # cosine decay
init_from = None  # checkpoint to resume from
keep_ratios = [1.0, 0.5]  # capacity per recursion
betas = (0.9, 0.95)
prompt = "\\n"
'''


def make_globals(tmp_path=None):
    """A script's globals, as configure(globals()) would see them (plus things that are not config)."""
    g = {'__file__': str(tmp_path / 'train.py') if tmp_path else 'train.py', '__doc__': 'Train a tiny model.',
         'os': os, 'helper': lambda: None, 'Thing': dict,  # a module, a function, a class: not config
         'out_dir': 'out#1', 'max_iters': 5000, 'learning_rate': 6e-4, 'dropout': 0.0, 'compile': False,
         'decay_lr': True, 'init_from': None, 'keep_ratios': [1.0, 0.5], 'betas': (0.9, 0.95), 'prompt': '\n'}
    if tmp_path:
        (tmp_path / 'train.py').write_text(SCRIPT)
    return g


def run(argv, g=None):
    g = make_globals() if g is None else g
    return configure(g, argv), g


def error_of(argv, g=None):
    """The message of the SystemExit that configure raises for argv."""
    with pytest.raises(SystemExit) as e:
        run(argv, g)
    assert isinstance(e.value.code, str) and e.value.code.startswith('error: '), e.value.code
    return e.value.code


def test_returns_config_keys_only_and_updates_globals_in_place():
    config, g = run(['--max_iters=100'])
    assert set(config) == {'out_dir', 'max_iters', 'learning_rate', 'dropout', 'compile', 'decay_lr',
                           'init_from', 'keep_ratios', 'betas', 'prompt'}
    assert g['max_iters'] == 100 and config['max_iters'] == 100
    assert config['learning_rate'] == 6e-4  # untouched keys keep their defaults


def test_no_args_changes_nothing():
    config, g = run([])
    assert config == {k: v for k, v in make_globals().items() if k in config}


def test_key_space_value():
    config, _ = run(['--max_iters', '100', '--out_dir', 'runs/a'])
    assert config['max_iters'] == 100 and config['out_dir'] == 'runs/a'


def test_negative_value_after_space_is_a_value():
    config, _ = run(['--max_iters', '-1'])
    assert config['max_iters'] == -1


def test_bare_flag_sets_true():
    config, _ = run(['--compile'])
    assert config['compile'] is True


def test_bare_flag_followed_by_another_flag():
    config, _ = run(['--compile', '--max_iters=3', '--decay_lr', 'no'])
    assert config['compile'] is True and config['max_iters'] == 3 and config['decay_lr'] is False


def test_bool_flag_takes_a_following_bool_word_only():
    config, _ = run(['--compile', 'false'])
    assert config['compile'] is False
    # a non-bool word after a bare flag is not eaten: here it is an (unexpected) positional arg
    assert "unexpected argument 'maybe'" in error_of(['--compile', 'maybe'])


@pytest.mark.parametrize('text, value', [('FALSE', False), ('False', False), ('false', False), ('no', False),
                                         ('0', False), ('True', True), ('TRUE', True), ('yes', True), ('1', True)])
def test_bool_any_case(text, value):
    key = 'compile' if value else 'decay_lr'  # defaults False and True: every case changes the value
    config, _ = run([f'--{key}={text}'])
    assert config[key] is value


def test_bad_bool():
    msg = error_of(['--compile=maybe'])
    assert 'compile' in msg and 'bool' in msg and "'maybe'" in msg


def test_int_for_float_key():
    config, _ = run(['--dropout=0', '--learning_rate', '1'])
    assert config['dropout'] == 0.0 and type(config['dropout']) is float
    assert config['learning_rate'] == 1.0 and type(config['learning_rate']) is float


def test_int_key_takes_integral_float_but_not_fraction():
    config, _ = run(['--max_iters=1e3'])
    assert config['max_iters'] == 1000 and type(config['max_iters']) is int
    assert 'max_iters' in error_of(['--max_iters=0.5'])


def test_none_default_key_settable():
    assert run(['--init_from=resume'])[0]['init_from'] == 'resume'  # not a literal: the raw string
    assert run(['--init_from=3'])[0]['init_from'] == 3
    assert run(['--init_from', '[1, 2]'])[0]['init_from'] == [1, 2]
    assert run(['--out_dir=None'])[0]['out_dir'] is None  # a str key can be set to None


def test_value_containing_equals():
    config, _ = run(['--prompt=a=b=c', '--init_from=x=1'])
    assert config['prompt'] == 'a=b=c' and config['init_from'] == 'x=1'


def test_str_key_keeps_digits_as_string():
    config, _ = run(['--prompt=123', '--out_dir', '1e3'])
    assert config['prompt'] == '123' and config['out_dir'] == '1e3'


def test_list_and_tuple_keys():
    assert run(['--keep_ratios=1,0.5,0.25'])[0]['keep_ratios'] == [1, 0.5, 0.25]
    assert run(['--keep_ratios=[1, 0.25]'])[0]['keep_ratios'] == [1, 0.25]
    assert run(['--keep_ratios=(1, 0.25)'])[0]['keep_ratios'] == [1, 0.25]  # the default's type wins
    assert run(['--keep_ratios=0.5'])[0]['keep_ratios'] == [0.5]
    betas = run(['--betas=0.8,0.99'])[0]['betas']
    assert betas == (0.8, 0.99) and type(betas) is tuple


def test_non_bool_key_needs_a_value():
    msg = error_of(['--max_iters'])
    assert '--max_iters needs a value' in msg and '5000' in msg
    assert '--out_dir needs a value' in error_of(['--out_dir', '--compile'])  # a flag is not a value


def test_bad_value_names_key_type_default_and_input():
    msg = error_of(['--max_iters=abc'])
    assert 'max_iters' in msg and 'int' in msg and '5000' in msg and "'abc'" in msg
    msg = error_of(['--dropout=high'])
    assert 'dropout' in msg and 'float' in msg and '0.0' in msg and "'high'" in msg


def test_unknown_key_suggests_close_match(tmp_path):
    msg = error_of(['--lerning_rate=1e-3'], make_globals(tmp_path))
    assert "unknown config key 'lerning_rate'" in msg
    assert "Did you mean 'learning_rate'?" in msg and 'python train.py --help' in msg
    assert 'Did you mean' not in error_of(['--zzzzqqq=1'])  # nothing close: no suggestion


def test_positional_that_is_not_a_config_file():
    msg = error_of(['max_iters=10'])
    assert 'max_iters=10' in msg and '--key=value' in msg


def test_config_file_after_overrides():
    assert 'must come before' in error_of(['--max_iters=1', 'config/tiny.py'])


def test_help_lists_keys_defaults_and_comments(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run(['--max_iters=1', '--help'], make_globals(tmp_path))
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith('Train a tiny model.')  # the module docstring comes first
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip().startswith('--')}
    assert '# total optimizer steps' in lines['--max_iters=5000']
    assert '# where checkpoints go' in lines["--out_dir='out#1'"]  # a '#' inside the value is not a comment
    assert '# capacity per recursion' in lines['--keep_ratios=[1.0,']
    assert '#' not in lines['--dropout=0.0']  # no comment in the source: none shown
    assert not any(k in out for k in ('--os', '--helper', '--Thing'))  # modules etc. are not keys


def test_short_help_flag(capsys):
    with pytest.raises(SystemExit) as e:
        run(['-h'])
    assert e.value.code == 0 and '--max_iters=5000' in capsys.readouterr().out


def test_config_file_then_cli_override_wins(tmp_path, capsys):
    cfg = tmp_path / 'tiny.py'
    cfg.write_text('import math\n_scratch = 3\nmax_iters = 10\nlearning_rate = 1  # an int is fine\n'
                   'init_from = "resume"\nkeep_ratios = (1, 0.5)\ndropout = math.sqrt(0.01)\n')
    config, g = run([str(cfg), '--max_iters=7'])
    assert config['max_iters'] == 7  # the CLI comes after the file
    assert config['learning_rate'] == 1.0 and type(config['learning_rate']) is float
    assert config['init_from'] == 'resume' and config['keep_ratios'] == [1, 0.5]
    assert config['dropout'] == pytest.approx(0.1)
    assert 'math' not in g and '_scratch' not in g and g['os'] is os  # the file ran in its own namespace
    out = capsys.readouterr().out
    assert f'Overriding config with {cfg}' in out and 'Overriding: max_iters = 7' in out


def test_config_files_apply_in_order(tmp_path):
    (tmp_path / 'a.py').write_text('max_iters = 1\ndropout = 0.1\n')
    (tmp_path / 'b.py').write_text('max_iters = 2\n')
    config, _ = run([str(tmp_path / 'a.py'), str(tmp_path / 'b.py')])
    assert config['max_iters'] == 2 and config['dropout'] == 0.1


def test_config_file_unknown_key(tmp_path):
    (tmp_path / 'bad.py').write_text('max_iter = 10\n')
    msg = error_of([str(tmp_path / 'bad.py')])
    assert "unknown config key 'max_iter'" in msg and 'bad.py' in msg and "Did you mean 'max_iters'?" in msg


@pytest.mark.parametrize('line', ['compile = 1', 'max_iters = True', 'max_iters = 10.5', 'out_dir = 3',
                                  'keep_ratios = 0.5', 'learning_rate = "fast"'])
def test_config_file_wrong_type(tmp_path, line):
    (tmp_path / 'bad.py').write_text(line + '\n')
    key = line.split()[0]
    msg = error_of([str(tmp_path / 'bad.py')])
    assert 'bad.py' in msg and f'{key} expects' in msg


def test_missing_config_file_lists_config_folder(tmp_path):
    (tmp_path / 'config').mkdir()
    (tmp_path / 'config' / 'tiny.py').write_text('max_iters = 1\n')
    msg = error_of(['config/tinny.py'], make_globals(tmp_path))
    assert "'config/tinny.py' not found" in msg and 'config/tiny.py' in msg


@pytest.mark.parametrize('script, arg, message', [
    ('sample.py', '--prompt=', 'the prompt is empty'),
    ('train.py', '--learning_rate=-1', 'learning_rate must be > 0, got -1.0'),
    ('train.py', '--min_lr=0.5', 'min_lr must be between 0 and learning_rate'),
    ('train.py', '--batch_size=0', 'batch_size must be >= 1, got 0: set --batch_size to 1 or more'),
    ('train.py', '--out_dir={file}', 'is a file, but out_dir must be a folder'),
])
def test_bad_values_fail_in_one_line(tmp_path, script, arg, message):
    """What a new user tries: a clear one-line error before any work starts, not a traceback later."""
    (tmp_path / 'a_file').write_text('')
    p = subprocess.run([sys.executable, script, arg.format(file=tmp_path / 'a_file'), '--device=cpu'],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and 'Traceback' not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and message in p.stderr, p.stderr


def test_require_at_least():
    config = {'batch_size': 1, 'max_iters': 0, 'eval_iters': 0}
    require_at_least(config, batch_size=1, max_iters=0)   # the bounds themselves are allowed
    with pytest.raises(SystemExit, match=r'eval_iters must be >= 1, got 0: set --eval_iters to 1 or more'):
        require_at_least(config, batch_size=1, eval_iters=1)


def test_plot_depth_history(tmp_path, capsys):
    """train.py --plot: draws depth_hist.csv when matplotlib is installed, else says it skipped."""
    csv_path, png = tmp_path / 'depth_hist.csv', tmp_path / 'depths.png'
    plot_depth_history(str(csv_path), str(png))
    assert 'no ' in capsys.readouterr().out and not png.exists()   # no CSV yet: a note, no crash
    csv_path.write_text('iter,kind,depth,tokens,fraction\n' + ''.join(
        f'{it},{kind},{d},{n},{n / 8}\n' for it in (0, 10) for kind in ('train', 'val_causal')
        for d, n in enumerate((0, 2, 6 if it else 3, 0 if it else 3))))
    plot_depth_history(str(csv_path), str(png))
    if importlib.util.find_spec('matplotlib') is None:   # optional: not in requirements.txt
        assert 'needs matplotlib' in capsys.readouterr().out and not png.exists()
    else:
        assert png.read_bytes()[:4] == b'\x89PNG'


def test_autodetect_device():
    device = autodetect_device('auto')
    expected = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    assert device == expected
    assert autodetect_device('cpu') == 'cpu'
    with pytest.raises(SystemExit, match='unknown device'):
        autodetect_device('tpu')
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match='not available'):
            autodetect_device('cuda')


def test_autocast_is_float32_nullcontext_off_cuda():
    for dtype in ('auto', 'float32', 'bfloat16', 'float16'):
        ctx, resolved = autocast_context('cpu', dtype)
        assert resolved == 'float32' and isinstance(ctx, contextlib.nullcontext)
    with pytest.raises(SystemExit, match='unknown dtype'):
        autocast_context('cpu', 'fp8')


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_autocast_on_cuda():
    ctx, resolved = autocast_context('cuda', 'auto')
    assert resolved == ('bfloat16' if torch.cuda.is_bf16_supported() else 'float16')
    with ctx:
        y = torch.randn(4, 4, device='cuda') @ torch.randn(4, 4, device='cuda')
    assert y.dtype == getattr(torch, resolved)


@pytest.mark.parametrize("script, args", [
    ("train.py", ["--max_iters=0", "--eval_iters=1", "--batch_size=1", "--block_size=8", "--n_layer=1",
                  "--n_embd=16", "--n_head=1", "--out_dir={tmp}"]),   # a whole run, evaluation only
    ("sample.py", ["--out_dir={tmp}"]),                   # then: no checkpoint in the empty out_dir
    ("bench.py", ["--mode=none"]),                        # then: an unknown mode
    ("tune.py", ["--hf={tmp}", "--out_dir={tmp}"]),       # then: no model in the empty folder
])
def test_threads_key_sets_torch_threads_and_says_so(tmp_path, data_dir, script, args):
    """--threads=3 under OMP_NUM_THREADS=1: the line each script prints first reports torch's own count, so it
    reads 3 only if the key reached torch.set_num_threads."""
    args = [a.format(tmp=tmp_path) for a in args] + ["--threads=3"]
    args += [f"--data_dir={data_dir}"] if script == "train.py" else []
    p = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert "3 CPU threads (--threads)" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-2000:]


def test_a_quoted_torch_error_is_its_whole_first_line(tmp_path, monkeypatch):
    """load_checkpoint and read_router_file quote torch.load's error: the first line whole (not cut at a length),
    and for the weights_only refusal, the line that names what it refused."""
    import argparse
    import hf_wrap
    from configurator import load_checkpoint
    path = str(tmp_path / "ckpt.pt")
    torch.save({"args": argparse.Namespace(lr=1)}, path)              # a pickled object: weights_only refuses it
    with pytest.raises(SystemExit, match=r"\(UnpicklingError: WeightsUnpickler error: Unsupported global: GLOBAL "
                                         r"argparse\.Namespace was not an allowed global .* if you trust this class"):
        load_checkpoint(path)
    long = "x" * 300 + " the end of the first line."
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(f"{long}\nthe second")))
    for load, error in ((load_checkpoint, SystemExit), (hf_wrap.read_router_file, ValueError)):
        with pytest.raises(error) as caught:
            load(path)
        assert f"(RuntimeError: {long})" in str(caught.value) and "the second" not in str(caught.value)
