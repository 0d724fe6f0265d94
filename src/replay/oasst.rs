//! OpenAssistant message trees flattened into conversations.

use std::path::Path;

use serde::Deserialize;

use super::events::json_error;
use super::{ReplayError, read_text};

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTurn {
    /// "user" or "assistant". OpenAssistant's "prompter" becomes "user".
    pub role: String,
    pub content: String,
}

/// One root-to-leaf path of a message tree that ends in an assistant message.
///
/// The `Debug` output contains the message text, so log only the ids.
#[derive(Debug, Clone)]
pub struct Conversation {
    pub tree_id: String,
    /// Id of the assistant message that is the answer.
    pub answer_message_id: String,
    /// The turns before the answer, ending with the user's turn.
    pub history: Vec<ChatTurn>,
    pub answer: String,
}

impl Conversation {
    /// Returns the turns before the answer as the messages of a
    /// `stream.started`.
    pub fn prompt_messages(&self) -> Vec<crate::messages::ChatMessage> {
        self.history
            .iter()
            .map(|turn| crate::messages::ChatMessage {
                role: turn.role.clone(),
                content: turn.content.clone(),
                name: None,
            })
            .collect()
    }
}

#[derive(Deserialize)]
struct TreeLine {
    message_tree_id: String,
    prompt: Message,
}

#[derive(Deserialize)]
struct Message {
    message_id: String,
    text: String,
    role: String,
    #[serde(default)]
    replies: Vec<Message>,
}

/// Loads an OpenAssistant tree file (one `message_tree_id` and `prompt` tree
/// per line) and returns one conversation for every root-to-leaf path whose
/// leaf is an assistant message. Paths that end in a user message are skipped.
pub fn load_conversations(path: &Path) -> Result<Vec<Conversation>, ReplayError> {
    let text = read_text(path)?;
    let mut conversations = Vec::new();

    for (index, line) in text.lines().enumerate() {
        let line_number = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|error| json_error(&error, line_number))?;
        // The serde message is dropped because it can quote message text.
        let tree: TreeLine =
            serde_json::from_value(value).map_err(|_| ReplayError::InvalidTree {
                line: line_number,
                reason: "the line does not match the OpenAssistant tree schema".to_string(),
            })?;

        let mut walk = TreeWalk {
            tree_id: &tree.message_tree_id,
            line: line_number,
            path: Vec::new(),
            conversations: &mut conversations,
        };
        walk.visit(&tree.prompt)?;
    }
    Ok(conversations)
}

/// Depth-first walk of one tree that keeps the turns from the root to the
/// current message. The depth is bounded by serde_json's nesting limit of 128.
struct TreeWalk<'a> {
    tree_id: &'a str,
    line: usize,
    path: Vec<ChatTurn>,
    conversations: &'a mut Vec<Conversation>,
}

impl TreeWalk<'_> {
    fn visit(&mut self, message: &Message) -> Result<(), ReplayError> {
        let role = match message.role.as_str() {
            "prompter" => "user",
            "assistant" => "assistant",
            _ => {
                return Err(self.invalid(format!(
                    "message {} has a role other than prompter or assistant",
                    message.message_id
                )));
            }
        };

        if message.replies.is_empty() {
            if role == "assistant" {
                self.push_conversation(message)?;
            }
            return Ok(());
        }

        self.path.push(ChatTurn {
            role: role.to_string(),
            content: message.text.clone(),
        });
        for reply in &message.replies {
            self.visit(reply)?;
        }
        self.path.pop();
        Ok(())
    }

    fn push_conversation(&mut self, answer: &Message) -> Result<(), ReplayError> {
        let ends_with_user = self.path.last().is_some_and(|turn| turn.role == "user");
        if !ends_with_user {
            return Err(self.invalid(format!(
                "assistant message {} does not reply to a prompter message",
                answer.message_id
            )));
        }
        self.conversations.push(Conversation {
            tree_id: self.tree_id.to_string(),
            answer_message_id: answer.message_id.clone(),
            history: self.path.clone(),
            answer: answer.text.clone(),
        });
        Ok(())
    }

    fn invalid(&self, reason: String) -> ReplayError {
        ReplayError::InvalidTree {
            line: self.line,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TREES: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/data/oasst-en100/en_100_tree.jsonl"
    );

    fn conversations() -> Vec<Conversation> {
        load_conversations(Path::new(TREES)).expect("bundled OpenAssistant trees load")
    }

    #[test]
    fn trees_flatten_to_400_conversations() {
        assert_eq!(conversations().len(), 400);
    }

    #[test]
    fn every_history_ends_with_user() {
        for conversation in conversations() {
            let last = conversation.history.last().expect("history is not empty");
            assert_eq!(
                last.role, "user",
                "answer {} follows a non-user turn",
                conversation.answer_message_id
            );
        }
    }

    #[test]
    fn history_roles_alternate_from_user() {
        for conversation in conversations() {
            for (position, turn) in conversation.history.iter().enumerate() {
                let expected = if position % 2 == 0 {
                    "user"
                } else {
                    "assistant"
                };
                assert_eq!(
                    turn.role, expected,
                    "turn {position} before answer {}",
                    conversation.answer_message_id
                );
            }
        }
    }

    #[test]
    fn answer_ids_are_unique() {
        let conversations = conversations();
        let ids: std::collections::HashSet<_> = conversations
            .iter()
            .map(|conversation| conversation.answer_message_id.as_str())
            .collect();
        assert_eq!(ids.len(), conversations.len());
    }

    #[test]
    fn conversations_span_96_trees() {
        // The other 4 of the 100 trees have no assistant message as a leaf.
        let trees: std::collections::HashSet<_> = conversations()
            .into_iter()
            .map(|conversation| conversation.tree_id)
            .collect();
        assert_eq!(trees.len(), 96);
    }

    #[test]
    fn unknown_role_is_rejected() {
        let dir = std::env::temp_dir().join(format!("replay-oasst-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temporary directory is writable");
        let path = dir.join("unknown-role.jsonl");
        let tree = r#"{"message_tree_id":"t1","prompt":{"message_id":"m1","text":"x","role":"system","replies":[]}}"#;
        std::fs::write(&path, tree).expect("temporary file is writable");

        let error = load_conversations(&path).expect_err("role `system` is rejected");
        std::fs::remove_dir_all(&dir).ok();

        assert!(matches!(error, ReplayError::InvalidTree { line: 1, .. }));
    }
}
