"""The resolver against the rules of the engine's Dockerfile frontend (Docker 20.10, BuildKit v0.8)."""

from __future__ import annotations

import pytest

from builder.server.dockerfile_refs import image_references, onbuild_references
from builder.server.errors import UnresolvableImageReference

pytestmark = pytest.mark.unit


def refs(text: str, **build_args: str) -> list[str]:
    return [ref.reference for ref in image_references(text, build_args)]


def refused(text: str, **build_args: str) -> str:
    with pytest.raises(UnresolvableImageReference) as info:
        image_references(text, build_args)
    return info.value.message


# --- FROM, stages, scratch ---


def test_from_is_normalised_the_way_the_engine_reads_it() -> None:
    (ref,) = image_references("FROM builder-busybox\n", {})
    assert (ref.reference, str(ref.normalised), ref.line, ref.origin) == (
        "builder-busybox",
        "docker.io/library/builder-busybox:latest",
        1,
        "FROM",
    )


def test_scratch_is_not_an_image() -> None:
    assert refs("FROM scratch\nCOPY --from=scratch /a /b\n") == []


def test_a_previous_stage_is_not_an_image_and_chains_resolve_to_the_first_base() -> None:
    text = "FROM tenant-a/base:1 AS one\nFROM one AS two\nFROM two\nCOPY --from=one /a /b\n"
    assert refs(text) == ["tenant-a/base:1"]


def test_stage_names_are_matched_case_insensitively_by_copy_from() -> None:
    assert refs("FROM tenant-a/x AS Build\nFROM scratch\nCOPY --from=BUILD /a /b\n") == ["tenant-a/x"]


def test_from_a_stage_in_other_case_is_refused_as_buildkit_rejects_it() -> None:
    assert "lowercase" in refused("FROM tenant-a/x AS build\nFROM Build\n")


def test_a_stage_named_like_an_official_image_shadows_it() -> None:
    assert refs("FROM tenant-a/x AS busybox\nFROM busybox\n") == ["tenant-a/x"]


def test_a_stage_cannot_be_named_like_a_tenant_image() -> None:
    assert "invalid stage name" in refused("FROM tenant-a/x AS tenant-b/x\n")


def test_copy_from_a_later_stage_is_an_image_to_the_legacy_builder() -> None:
    assert refs("FROM scratch\nCOPY --from=later /a /b\nFROM tenant-a/x AS later\n") == ["later", "tenant-a/x"]


def test_a_name_that_is_a_later_stage_everywhere_is_not_an_image_in_run_mount() -> None:
    text = "FROM scratch\nRUN --mount=from=later,target=/m true\nFROM tenant-a/x AS later\n"
    assert refs(text) == ["tenant-a/x"]


def test_every_stage_is_checked_not_only_those_before_the_target() -> None:
    assert refs("FROM tenant-a/x AS wanted\nFROM tenant-b/y AS unused\n") == ["tenant-a/x", "tenant-b/y"]


def test_instructions_are_case_insensitive() -> None:
    assert refs("from tenant-b/x\nFrOm scratch\ncopy --from=tenant-c/y /a /b\n") == ["tenant-b/x", "tenant-c/y"]


def test_from_platform_flag_is_accepted_and_not_a_reference() -> None:
    assert refs("FROM --platform=linux/amd64 tenant-b/x AS a\n") == ["tenant-b/x"]


@pytest.mark.parametrize("text", ["FROM --foo=x tenant-b/x\n", "FROM\n", "FROM a b\n", "FROM a AS b c\n"])
def test_from_lines_the_engine_rejects_are_refused(text: str) -> None:
    assert "engine rejects" in refused(text)


def test_json_form_in_from_is_not_a_reference() -> None:
    assert "not a valid image reference" in refused('FROM ["tenant-b/x"]\n')


def test_path_tricks_are_invalid_references() -> None:
    assert "not a valid image reference" in refused("FROM index.docker.io/library/../..\n")


# --- COPY --from, ADD, RUN --mount ---


def test_copy_from_an_image() -> None:
    (ref,) = image_references("FROM scratch\nCOPY --from=tenant-b/x:v1 /secret /s\n", {})
    assert (ref.reference, ref.line, ref.origin) == ("tenant-b/x:v1", 2, "COPY --from")


def test_copy_from_a_stage_index_is_not_an_image() -> None:
    assert refs("FROM tenant-a/x\nFROM scratch\nCOPY --from=0 /a /b\nCOPY --from=+0 /a /b\n") == ["tenant-a/x"]


def test_copy_from_is_not_expanded_by_the_engine() -> None:
    assert "does not substitute" in refused("ARG X=tenant-b/x\nFROM scratch\nCOPY --from=$X /a /b\n")


def test_copy_flag_words_lose_quotes_and_backslashes_as_the_engine_does() -> None:
    assert refs('FROM scratch\nCOPY --"from"=tenant-b\\/x /a /b\n') == ["tenant-b/x"]


@pytest.mark.parametrize("flag", ["--from tenant-b/x", "--FROM=tenant-b/x", "--from=a --from=b"])
def test_copy_flags_the_engine_rejects_are_refused(flag: str) -> None:
    assert "engine rejects" in refused(f"FROM scratch\nCOPY {flag} /a /b\n")


def test_add_from_is_refused_as_this_engine_has_no_such_flag() -> None:
    assert "no flag --from" in refused("FROM scratch\nADD --from=tenant-b/x /a /b\n")


def test_a_flag_after_the_first_argument_is_an_argument() -> None:
    assert refs("FROM scratch\nCOPY /a --from=tenant-b/x /b\n") == []


def test_run_mount_from_an_image_of_any_mount_type_but_tmpfs() -> None:
    text = (
        "FROM scratch\n"
        "RUN --mount=type=bind,from=tenant-b/x,target=/m --mount=type=cache,FROM=tenant-c/y,target=/c true\n"
        "RUN --mount=type=tmpfs,from=tenant-d/z,target=/t --mount=type=cache,target=/c true\n"
    )
    assert refs(text) == ["tenant-b/x", "tenant-c/y"]


def test_run_mount_from_a_stage_is_not_an_image() -> None:
    assert refs("FROM tenant-a/x AS build\nRUN --mount=from=Build,target=/m true\n") == ["tenant-a/x"]


def test_run_mount_from_is_not_expanded_by_the_engine() -> None:
    assert "does not substitute" in refused("ARG X=a\nFROM scratch\nRUN --mount=from=${X},target=/m true\n")


def test_quotes_around_a_mount_flag_are_the_flag_readers() -> None:
    assert refs('FROM scratch\nRUN --mount="from=tenant-b/x",target=/m true\n') == ["tenant-b/x"]


def test_quoted_csv_fields_in_a_mount_are_refused() -> None:
    assert "quoted CSV" in refused("FROM scratch\nRUN --mount='\"from=tenant-b/x\",target=/m' true\n")


def test_a_byte_0x85_is_a_blank_to_the_flag_reader() -> None:
    # The engine reads flags byte by byte; 0x85 (NEL) is a space to it: this mount is real.
    text = b"FROM scratch\nRUN \x85--mount=from=tenant-b/x,target=/m true\n".decode("utf-8", "surrogateescape")
    assert refs(text) == ["tenant-b/x"]


def test_non_ascii_inside_a_flag_is_refused() -> None:
    assert "non-ASCII" in refused("FROM scratch\nCOPY --from=tenant-b/\u00e9 /a /b\n")


def test_non_ascii_after_the_flags_is_fine() -> None:
    assert refs("FROM scratch\nRUN echo h\u00e9llo --mount=from=tenant-b/x\n") == []


# --- ARG and substitution ---


def test_global_arg_default_is_used_in_from() -> None:
    assert refs("ARG BASE=tenant-b/x\nFROM $BASE\n") == ["tenant-b/x"]


def test_build_arg_overrides_a_declared_arg() -> None:
    assert refs("ARG BASE=tenant-a/x\nFROM ${BASE}\n", BASE="tenant-b/x") == ["tenant-b/x"]


def test_build_arg_overrides_an_arg_declared_without_a_value() -> None:
    assert refs("ARG TAG\nFROM tenant-a/x:${TAG:-v1}\n", TAG="v2") == ["tenant-a/x:v2"]


def test_an_undeclared_build_arg_is_not_substituted_and_refused_in_from() -> None:
    assert "not declared" in refused("FROM tenant-a/x${SUFFIX}\n", SUFFIX="/../tenant-b")


def test_an_arg_declared_inside_a_stage_does_not_reach_a_later_from() -> None:
    assert "not declared" in refused("FROM scratch\nARG B=tenant-b/x\nFROM $B\n")


def test_substitution_forms() -> None:
    text = "ARG SET=s\nARG EMPTY=\nFROM x/a-${SET:-d}-${EMPTY:-d}-${SET:+p}-${EMPTY:+p}-${SET}-$SET\n"
    assert refs(text) == ["x/a-s-d-p--s-s"]


def test_dash_and_plus_without_colon_are_rejected_by_this_engine() -> None:
    assert "missing ':'" in refused("ARG A\nFROM x/${A-default}\n")


def test_an_escaped_dollar_stays_literal_and_is_refused() -> None:
    assert "still has a '$'" in refused("ARG A=b\nFROM x/\\$A\n")


def test_quotes_are_removed_in_from_and_in_arg_values() -> None:
    assert refs('ARG B="tenant-b"/\'x\'\nFROM "$B"\n') == ["tenant-b/x"]


def test_arg_defaults_see_earlier_args() -> None:
    assert refs("ARG NS=tenant-b\nARG IMAGE=$NS/x\nFROM $IMAGE\n") == ["tenant-b/x"]


def test_the_legacy_builder_expands_an_arg_line_at_once() -> None:
    # BuildKit sees A=one when expanding B; the legacy builder does not (B = "x/-y", no image).
    assert refs("ARG A=one B=x/$A-y\nFROM $B\n") == ["x/one-y"]


def test_both_builders_readings_are_returned_when_they_differ() -> None:
    # Inside ARG defaults the legacy builder predefines the *_PROXY build args; BuildKit does not.
    assert refs("ARG A=tenant-a${HTTP_PROXY}/x\nFROM $A\n", HTTP_PROXY="b") == ["tenant-a/x", "tenant-ab/x"]


def test_buildkits_platform_args_are_refused_in_from() -> None:
    assert "platform" in refused("ARG A=x:$TARGETARCH\nFROM $A\n")
    assert "not declared" in refused("FROM x:$TARGETARCH\n")


def test_arg_names_the_builders_read_differently_are_refused() -> None:
    assert "builders differ" in refused('ARG "A"=x\nFROM scratch\n')


def test_deep_nesting_is_refused_not_a_crash() -> None:
    text = "ARG A\nFROM x/" + "${A:-" * 600 + "y" + "}" * 600 + "\n"
    assert "nested too deeply" in refused(text)


def test_an_arg_that_cannot_be_expanded_only_matters_when_a_from_uses_it() -> None:
    assert refs("ARG A=${\nFROM tenant-a/x\n") == ["tenant-a/x"]
    assert "cannot expand" in refused("ARG A=${\nFROM tenant-a/$A\n")


# --- Parser directives, continuations, comments ---


def test_escape_directive_changes_continuations_and_escapes() -> None:
    text = "# escape=`\nARG NS=tenant-`\nb\nFROM ${NS}/x\nRUN echo \\\nFROM tenant-c/y\n"
    assert refs(text) == ["tenant-b/x", "tenant-c/y"]


def test_escape_directive_after_a_comment_is_only_a_comment() -> None:
    text = "# hello\n# escape=`\nFROM tenant-a/x `\nFROM tenant-b/y\n"
    assert "engine rejects" in refused(text)  # no continuation: "`" is a third FROM argument


def test_escape_directive_after_a_blank_line_is_only_a_comment() -> None:
    assert refs("\n# escape=`\nFROM scratch\nRUN echo \\\nFROM tenant-b/x\n") == []


def test_escape_directive_after_a_bom_and_blanks_is_a_directive() -> None:
    assert refs("\ufeff  #  ESCAPE = ` \nFROM scratch\nRUN echo \\\nFROM tenant-b/x\n") == ["tenant-b/x"]


def test_a_second_escape_directive_is_refused() -> None:
    assert "second escape" in refused("# escape=`\n# escape=\\\nFROM scratch\n")


def test_continuations_skip_comment_and_blank_lines_and_join_without_blanks() -> None:
    text = "FROM tenant-\\\n\n  # comment \\\n#\nb/\\\n \t\nx\n"
    assert refs(text) == ["tenant-b/x"]


def test_continued_lines_keep_their_leading_blanks() -> None:
    assert "engine rejects" in refused("FROM tenant-b/\\\n  x\n")


def test_an_escaped_backslash_does_not_continue_so_the_next_from_is_real() -> None:
    assert refs("FROM scratch\nRUN echo \\\\\nFROM tenant-b/x\n") == ["tenant-b/x"]


def test_a_continued_comment_does_not_swallow_the_next_line() -> None:
    assert refs("FROM scratch\n# note \\\nFROM tenant-b/x\n") == ["tenant-b/x"]


def test_a_line_continuation_can_hide_a_from_inside_a_run() -> None:
    assert refs("FROM scratch\nRUN echo \\\nFROM tenant-b/x\n") == []


def test_crlf_line_ends() -> None:
    assert refs("FROM scratch\r\nCOPY --from=tenant-b/x /a /b\r\n") == ["tenant-b/x"]


def test_a_line_over_the_engines_limit_is_refused() -> None:
    assert "line limit" in refused("FROM scratch\nRUN echo " + "x" * 70000 + "\n")


# --- Heredocs, unknown instructions, syntax directive ---


def test_heredocs_are_refused_naming_the_first_body_line() -> None:
    message = refused("FROM scratch\nRUN <<EOF\necho hi\nEOF\n")
    assert message.startswith("line 3: unknown instruction 'echo'") and "no heredocs" in message


def test_a_heredoc_body_made_of_instructions_is_instructions() -> None:
    assert refs("FROM scratch\nRUN cat <<LABEL\nFROM tenant-b/x\nLABEL a=b\n") == ["tenant-b/x"]


def test_an_instruction_before_the_first_from_other_than_arg_is_refused() -> None:
    assert "before the first FROM" in refused("RUN true\nFROM scratch\n")


def test_a_non_ascii_instruction_is_refused() -> None:
    # Go lowercases the Turkish dotted I to "i": "ONBUİLD" would be ONBUILD to the engine.
    assert "not ASCII" in refused("FROM scratch\nONBU\u0130LD COPY --from=tenant-b/x a b\n")


def test_syntax_directive_is_refused() -> None:
    assert "'tenant-b/frontend'" in refused("# syntax=tenant-b/frontend\nFROM scratch\n")


def test_syntax_directive_after_another_directive_like_line_is_still_seen_by_buildkit() -> None:
    assert "frontend image 'x/y'" in refused("# foo=bar\n#syntax = x/y extra\nFROM scratch\n")


def test_syntax_directive_after_a_blank_line_is_a_comment() -> None:
    assert refs("\n# syntax=tenant-b/frontend\nFROM scratch\n") == []


def test_buildkit_syntax_build_arg_is_refused() -> None:
    assert "BUILDKIT_SYNTAX" in refused("FROM scratch\n", BUILDKIT_SYNTAX="tenant-b/frontend")


def test_disabling_file_ops_adds_buildkits_helper_images() -> None:
    assert refs("FROM scratch\n", BUILDKIT_DISABLE_FILEOP="1")[1] == "busybox"


# --- Image IDs ---


@pytest.mark.parametrize("ref", ["a48443", "a4844350f547", "sha256:a4", "a" * 64, "sha256:" + "a" * 64])
def test_what_could_be_an_image_id_is_refused(ref: str) -> None:
    assert "image ID" in refused(f"FROM {ref}\n")


def test_an_image_id_in_copy_from_is_refused() -> None:
    assert "image ID" in refused("FROM scratch\nCOPY --from=deadbeef /a /b\n")


def test_hex_with_a_tag_is_a_name() -> None:
    assert refs("FROM cafe:1\n") == ["cafe:1"]


# --- ONBUILD ---


def test_onbuild_triggers_are_checked_when_recorded() -> None:
    text = "FROM scratch\nONBUILD COPY --from=tenant-b/x /a /b\nONBUILD RUN --mount=from=c/d true\n"
    found = image_references(text, {})
    assert [(ref.reference, ref.line, ref.origin) for ref in found] == [
        ("tenant-b/x", 2, "ONBUILD COPY --from"),
        ("c/d", 3, "ONBUILD RUN --mount"),
    ]


def test_onbuild_trigger_names_are_images_since_the_later_build_is_unknown() -> None:
    assert refs("FROM tenant-a/x AS build\nONBUILD COPY --from=build /a /b\n") == ["tenant-a/x", "build"]


@pytest.mark.parametrize("trigger", ["ONBUILD COPY a b", "FROM x", "MAINTAINER me"])
def test_onbuild_triggers_the_engine_rejects_are_refused(trigger: str) -> None:
    assert "ONBUILD trigger (the engine rejects this)" in refused(f"FROM scratch\nONBUILD {trigger}\n")


def test_a_base_images_triggers_are_resolved_too() -> None:
    found = onbuild_references(["COPY --from=tenant-b/x /a /b", "RUN echo hi"])
    assert [(ref.reference, ref.origin) for ref in found] == [("tenant-b/x", "ONBUILD COPY --from")]


def test_absurdly_many_instructions_are_refused_not_followed() -> None:
    assert "more than 10000 instructions" in refused("FROM scratch\n" + "RUN x\n" * 10000)
