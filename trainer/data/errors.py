"""A data problem that names where it is (file:line), what is wrong, and a short reason code.

The reason code is what `data.on_error=skip` counts by ("malformed_json": 3), so the codes are a
small fixed vocabulary; the message is for humans.
"""

REASONS = {
    "malformed_json": "a line that is not valid JSON",
    "invalid_utf8": "bytes that are not UTF-8",
    "corrupt_archive": "a compressed file that is truncated or damaged",
    "bom": "a byte-order mark inside a file (files concatenated?)",
    "not_an_object": "a record that is not a JSON object",
    "missing_field": "a record without the fields of its format",
    "bad_message": "a chat message without role/content",
    "unknown_role": "a chat role that is not system/user/assistant/tool",
    "empty_conversation": "a conversation with no messages",
    "assistant_first": "an assistant turn before any user turn",
    "no_assistant_turn": "a conversation with no assistant turn",
    "zero_trainable": "a sample with no trainable token after masking",
    "template": "a chat template problem",
    # preference data (trainer/data/preference.py)
    "bad_pair": "a pair whose answer part is not one assistant message",
    "empty_answer": "a chosen, rejected or KTO answer that is empty",
    "identical_answers": "a pair whose chosen and rejected answers are the same",
    "no_shared_prompt": "chosen and rejected conversations that do not share a prompt",
    "bad_label": "a KTO label that is not a boolean",
    "too_long": "an answer longer than data.max_seq_len even with the prompt cut to nothing",
    "one_sided": "KTO data with only desirable examples",
    # data.streaming (trainer/data/streamed.py): never skipped
    "not_seekable": "a source that data.streaming cannot read one record at a time",
    "source_changed": "a streamed source that changed after it was indexed",
}


# Problems that end the reading of a whole file: skipping "one record" would hide the loss of the rest.
UNSKIPPABLE = ("corrupt_archive", "not_seekable", "source_changed")


class DataError(ValueError):
    def __init__(self, where: str, problem: str, reason: str = "invalid"):
        self.where, self.problem, self.reason = where, problem, reason
        super().__init__(f"{where}: {problem}")
