import ast

from pipeline.tasks.prompts import (
    SLOT,
    FimTokens,
    completion_prompt,
    cut_body,
    fim_prompt,
    find_fim_tokens,
    program,
    split_slot,
    state_source,
)

BODY = "    from sklearn.svm import SVC\n    model = SVC(probability=True).fit(x_train, y_train)"


def test_state_has_the_design_template():
    source = state_source("Balance Scale", (625, 4))
    assert source.startswith('"""Classification with a Balance Scale Prediction Dataset"""')
    assert "x_train in shape (625, 4)" in source and source.count(SLOT) == 1
    prefix, suffix = split_slot(source)
    assert completion_prompt(source) == prefix and prefix.endswith('y_train."""\n')
    assert suffix == "\n    return model\n"


def test_program_is_valid_python_with_the_body():
    code = program(state_source("Iris", (150, 4)), BODY)
    tree = ast.parse(code)
    function = next(n for n in tree.body if isinstance(n, ast.FunctionDef))
    assert function.name == "build_model" and isinstance(function.body[-1], ast.Return)


def test_reflection_shows_bounded_error_and_previous_body():
    error = "Traceback...\n" + "x" * 5000 + "\nValueError: bad"
    source = state_source("Iris", (150, 4), previous_body=BODY, error=error, max_error_chars=200)
    assert "# A previous version of build_model failed." in source
    assert "#     model = SVC(probability=True)" in source
    assert "# ValueError: bad" in source and "x" * 300 not in source
    ast.parse(program(source, BODY))  # comments keep the reflection a valid module


def test_stop_rule_cuts_on_dedent_and_return():
    assert cut_body(BODY + "\n\ndef other():\n    pass") == (BODY + "\n", True)
    assert cut_body(BODY + "\n    return model\n    x = 1") == (BODY + "\n    return model", True)
    assert cut_body(BODY + "\nif __name__") == (BODY, True)
    assert cut_body(BODY) == (BODY, False)  # may go on
    assert cut_body("    return model_b") == ("    return model_b", False)  # a partial line


def test_fim_prompt_uses_the_models_own_tokens():
    source = state_source("Iris", (150, 4))
    fim = find_fim_tokens({"<fim_prefix>": 1, "<fim_suffix>": 2, "<fim_middle>": 3, "a": 4})
    assert fim == FimTokens("<fim_prefix>", "<fim_suffix>", "<fim_middle>")
    prefix, suffix = split_slot(source)
    assert fim_prompt(source, fim) == f"<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>"
    assert find_fim_tokens({"<PRE>", "<SUF>", "<MID>"}).prefix == "<PRE>"
