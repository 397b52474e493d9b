"""`etpo credit`: token texts, colours and the drawing of per-token advantages."""

from transformers import AutoTokenizer

from pipeline.credit import CreditedAction, colour, draw_png, scale_of, token_pieces


def test_token_pieces_rebuild_the_text(tiny_base):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    body = "    model = RandomForestClassifier(n_estimators=100)\n    return model\n"
    ids = tokenizer(body, add_special_tokens=False)["input_ids"]
    pieces = token_pieces(tokenizer, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == body


def test_colours_are_white_at_zero_green_for_credit_red_for_blame():
    assert colour(0.0, 1.0) == (1.0, 1.0, 1.0)
    assert colour(2.0, 1.0) == (0.0, 1.0, 0.0)  # saturates at the scale
    red = colour(-0.5, 1.0)
    assert red[0] == 1.0 and red[1] == red[2] == 0.5
    assert colour(3.0, 0.0) == (1.0, 1.0, 1.0)  # no credit anywhere: all white


def test_png_is_written(tmp_path):
    action = CreditedAction(
        "t", ["    model", " =", " GaussianNB()", "\n", "    return model"], [0.1, 0, -2, 0, 0.5], [0.0] * 5
    )
    assert scale_of([action]) == 2.0
    draw_png([action], tmp_path / "credit.png")
    assert (tmp_path / "credit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
