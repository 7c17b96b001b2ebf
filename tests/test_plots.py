"""Per-protein pictures of predict.py (plots.py, --plot-dir)."""
from helpers import check_failure, run, write_fasta

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png(path):
    import matplotlib.image
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_plots_for_chosen_ids(tmp_path, ckpts, capsys):
    pairs = [("a.b", "MKLV" * 20), ("a_b", "MSTQ" * 9), ("we;ird$id$", "MKKRRKL" * 12), ("other", "MAAA" * 5)]
    fasta = write_fasta(tmp_path / "in.fa", pairs)
    plots = tmp_path / "plots" / "deep"
    code, err = run(capsys, "--checkpoint", ckpts["a"], "--fasta", fasta, "--plot-dir", plots,
                    "--plot-ids", "we;ird$id$", "a.b", "a_b", "--device", "cpu", "--chunk-size", 2)
    assert code == 0, err
    assert sorted(p.name for p in plots.iterdir()) == ["a_b.png", "a_b_2.png", "we_ird_id_.png"]
    for p in plots.iterdir():
        check_png(p)
    limited = tmp_path / "limited"
    code, err = run(capsys, "--checkpoint", ckpts["a"], "--fasta", fasta, "--plot-dir", limited, "--plot-limit", 2,
                    "--device", "cpu")
    assert code == 0, err
    assert sorted(p.name for p in limited.iterdir()) == ["a_b.png", "a_b_2.png"]  # the first two proteins


def test_plot_ids_not_in_input(tmp_path, ckpts, fasta, capsys):
    check_failure(capsys, tmp_path, ["--checkpoint", ckpts["a"], "--fasta", fasta, "--plot-ids", "prot1", "nope"],
                  "--plot-ids", "'nope'")


def test_a_long_id_is_cut_in_the_title(tmp_path, monkeypatch):
    """The title shows at most 80 characters of an id (a 1 MB id took 257 s and 1.1 GB to draw)."""
    import numpy as np
    from matplotlib.figure import Figure

    import plots
    titles = []
    real = Figure.suptitle
    monkeypatch.setattr(Figure, "suptitle", lambda self, text, **kw: titles.append(text) or real(self, text, **kw))
    record = {"id": "Q" * 1000, "length": 5, "predicted": [], "probabilities": dict.fromkeys(plots.CLASSES, 0.1),
              "sites": {}, "segments": {}}
    plots.draw(tmp_path / "p.png", record, np.zeros((8, 5)), [0.5] * 8)
    assert titles and titles[0].startswith("Q" * 77 + "...") and "Q" * 78 not in titles[0]
    check_png(tmp_path / "p.png")
