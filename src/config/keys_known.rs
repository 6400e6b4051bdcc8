//! Which keys a config file may hold, checked before the typed parse so that
//! an unknown key is one problem among the others (with its table and line)
//! instead of the error that stops all the rest.

use toml_edit::{ImDocument, Item, TableLike};

/// A table's keys: `None` for tables whose keys are the user's (`[keys]`,
/// `[bases]`, `[pins]`).
fn allowed(path: &str) -> Option<&'static [&'static str]> {
    Some(match path {
        "" => &[
            "server",
            "admin",
            "storage",
            "upstream",
            "policy",
            "keys",
            "bases",
            "audit",
            "rewrite",
            "pins",
            "pins_file",
            "auth",
            "tenant",
            "bundles",
            "identities",
            "sigstore",
        ],
        "server" => &[
            "listen",
            "max_manifest_size",
            "shutdown_timeout",
            "workers",
            "max_connections",
            "header_timeout",
            "send_timeout",
            "tls",
        ],
        "server.tls" => &["cert", "key", "client_ca"],
        "auth" => &["htpasswd"],
        "bundles" => &["signed_by"],
        "sigstore" => &["trusted_root"],
        "tenant" => &["name", "users", "clients", "repositories"],
        "admin" => &["listen"],
        "storage" => &[
            "path",
            "max_size",
            "tag_ttl",
            "base_refresh",
            "base_keep",
            "s3",
        ],
        "storage.s3" => &[
            "endpoint",
            "bucket",
            "region",
            "prefix",
            "access_key_env",
            "access_key_file",
            "secret_key_env",
            "secret_key_file",
            "ca",
            "max_size",
            "min_idle",
        ],
        "audit" => &["path", "approvals"],
        "upstream" => &[
            "name",
            "url",
            "offline",
            "default",
            "username",
            "password_file",
            "password_env",
            "ca",
            "idle_timeout",
            "aliases",
            "client_cert",
            "client_key",
        ],
        "policy" => &[
            "name",
            "match",
            "mode",
            "deny",
            "signed_by",
            "bases",
            "require_digest",
            "deny_tags",
            "tag_drift",
        ],
        "rewrite" => &["from", "to"],
        _ => return None,
    })
}

/// One unknown key: its path (`upstream[0].retries`), byte offset and the
/// message.
pub struct Unknown {
    pub key: String,
    pub offset: Option<usize>,
    pub message: String,
}

/// Every key the schema does not know. `Err` when the text is not TOML at
/// all (the typed parse reports that).
pub fn unknown_keys(text: &str) -> Result<Vec<Unknown>, ()> {
    let doc = ImDocument::parse(text).map_err(|_| ())?;
    let mut out = Vec::new();
    check(doc.as_table(), "", "", &mut out);
    Ok(out)
}

/// Checks `table` (schema `schema`, shown as `shown`) and the tables in it.
fn check(table: &dyn TableLike, schema: &str, shown: &str, out: &mut Vec<Unknown>) {
    let Some(keys) = allowed(schema) else {
        return;
    };
    for (name, item) in table.iter() {
        let path = if shown.is_empty() {
            name.to_owned()
        } else {
            format!("{shown}.{name}")
        };
        if !keys.contains(&name) {
            let offset = table
                .get_key_value(name)
                .and_then(|(k, _)| k.span())
                .map(|s| s.start);
            let mut message = format!("unknown key {name:?}: expected one of {}", keys.join(", "));
            if name == "pins_file" {
                message
                    .push_str(" (pins_file is a top-level key: put it above the first [section])");
            }
            out.push(Unknown {
                key: path,
                offset,
                message,
            });
            continue;
        }
        let inner = if schema.is_empty() {
            name.to_owned()
        } else {
            format!("{schema}.{name}")
        };
        match item {
            Item::Table(t) => check(t, &inner, &path, out),
            Item::Value(v) => {
                if let Some(t) = v.as_inline_table() {
                    check(t, &inner, &path, out);
                } else if let Some(list) = v.as_array() {
                    for (i, v) in list.iter().enumerate() {
                        if let Some(t) = v.as_inline_table() {
                            check(t, &inner, &format!("{path}[{i}]"), out);
                        }
                    }
                }
            }
            Item::ArrayOfTables(list) => {
                for (i, t) in list.iter().enumerate() {
                    check(t, &inner, &format!("{path}[{i}]"), out);
                }
            }
            Item::None => {}
        }
    }
}
