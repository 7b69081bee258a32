//! Chat prompts rendered with the model's own Jinja chat template (from the artifact's
//! manifest), the way Hugging Face's `apply_chat_template` does: `messages`,
//! `add_generation_prompt`, `bos_token`, `eos_token`, and `raise_exception`.

use minijinja::{Environment, Error, ErrorKind};

use super::EngineError;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The text.
    pub content: String,
}

/// The roles a message may have.
pub const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// Execution budget of one rendering: templates come with artifacts, and a runaway loop
/// must end in an error, not a hung engine.
const FUEL: u64 = 1_000_000;

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// Compiles `source`; `bos` and `eos` are the texts of the special tokens.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self, EngineError> {
        let mut env = Environment::new();
        env.set_fuel(Some(FUEL));
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_string()).map_err(template_error)?;
        Ok(ChatTemplate { env, bos: bos.into(), eos: eos.into() })
    }

    /// The prompt text for `messages`, ending with the assistant's turn opener.
    pub fn render(&self, messages: &[Message]) -> Result<String, EngineError> {
        if messages.is_empty() {
            return Err(EngineError::InvalidRequest { field: "messages", reason: "no messages".into() });
        }
        if let Some((i, m)) = messages.iter().enumerate().find(|(_, m)| !ROLES.contains(&m.role.as_str())) {
            return Err(EngineError::InvalidRequest {
                field: "messages",
                reason: format!("message {i} has role {:?}; roles are {}", m.role, ROLES.join(", ")),
            });
        }
        let t = self.env.get_template("chat").map_err(template_error)?;
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(template_error)
    }
}

fn template_error(e: Error) -> EngineError {
    EngineError::ChatTemplate(format!("{e:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }

    #[test]
    fn renders_a_chatml_template() {
        let source = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}\
                      {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let t = ChatTemplate::new(source, "<s>", "</s>").expect("compiles");
        let text = t.render(&[msg("system", "Be brief."), msg("user", "Hi")]).expect("renders");
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn template_errors_are_reported() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "").expect("compiles");
        let err = t.render(&[msg("user", "x")]).expect_err("raises").to_string();
        assert!(err.contains("roles must alternate"), "{err}");
        assert!(ChatTemplate::new("{% for %}", "", "").is_err());
        let endless = ChatTemplate::new(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "",
            "",
        )
        .expect("compiles");
        assert!(endless.render(&[msg("user", "x")]).is_err(), "runs out of fuel");
        assert!(t.render(&[]).is_err());
        let err = t.render(&[msg("user", "x"), msg("wizard", "y")]).expect_err("unknown role");
        assert!(err.to_string().contains("message 1 has role \"wizard\""), "{err}");
    }
}
