//! Tests only: a validator of Firecracker API requests against the
//! project's copy of Firecracker's Swagger 2.0 contract
//! (`shared/reference/firecracker/firecracker-v1.15.1.yaml`), for the
//! subset of Swagger that file uses, plus the order rules its text states
//! (what is pre-boot only, what needs a paused VM, what only a fresh
//! process accepts). [`super::contract_tests`] runs every plan through it.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

/// The workplace's reference copy, beside the checkout.
fn reference() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/reference/firecracker/firecracker-v1.15.1.yaml")
}

/// The copy kept in the repository (`contract/README.md`).
fn kept() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/vm/firecracker/contract/firecracker-v1.15.1.yaml")
}

/// Where the contract is looked for: `$AIRLOCK_FIRECRACKER_SPEC`, then the
/// reference copy beside the checkout, then the repository's copy.
fn candidates() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::env::var_os("AIRLOCK_FIRECRACKER_SPEC")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    out.extend([reference(), kept()]);
    out
}

/// Whether the repository's copy differs from the reference beside the
/// checkout (`None` without the reference).
pub fn kept_copy_differs() -> Option<bool> {
    let reference = std::fs::read(reference()).ok()?;
    Some(std::fs::read(kept()).ok().as_deref() != Some(&reference[..]))
}

/// The loaded contract.
#[derive(Debug)]
pub struct Spec {
    doc: Yaml,
}

impl Spec {
    /// Loads the contract; panics naming every place it looked (a missing
    /// contract must fail the tests, never skip them).
    pub fn load() -> Self {
        let tried = candidates();
        let Some(path) = tried.iter().find(|p| p.is_file()) else {
            panic!(
                "the Firecracker API contract is missing; looked at: {}",
                tried
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let doc: Yaml = serde_yaml::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()));
        assert_eq!(
            doc["swagger"].as_str(),
            Some("2.0"),
            "{}: not Swagger 2.0",
            path.display()
        );
        Self { doc }
    }

    /// The contract's version (`info.version`).
    pub fn version(&self) -> &str {
        self.doc["info"]["version"].as_str().unwrap_or("?")
    }

    /// The path template matching `path` (`/drives/layer0` ->
    /// `/drives/{drive_id}`), an exact path first.
    pub fn template(&self, path: &str) -> Option<String> {
        let paths = self.doc["paths"].as_mapping()?;
        let keys: Vec<&str> = paths.keys().filter_map(Yaml::as_str).collect();
        if keys.contains(&path) {
            return Some(path.to_string());
        }
        let segs: Vec<&str> = path.split('/').collect();
        keys.into_iter()
            .find(|t| {
                let tsegs: Vec<&str> = t.split('/').collect();
                tsegs.len() == segs.len()
                    && tsegs.iter().zip(&segs).all(|(t, s)| {
                        (t.starts_with('{') && t.ends_with('}') && !s.is_empty()) || t == s
                    })
            })
            .map(str::to_string)
    }

    fn operation(&self, method: &str, template: &str) -> Option<&Yaml> {
        let op = &self.doc["paths"][template][method.to_ascii_lowercase().as_str()];
        (!op.is_null()).then_some(op)
    }

    /// Every `(METHOD, template)` whose summary says "Pre-boot only".
    pub fn pre_boot_only(&self) -> BTreeSet<(String, String)> {
        self.marked("Pre-boot only")
    }

    /// Every `(METHOD, template)` whose summary says "Post-boot only".
    pub fn post_boot_only(&self) -> BTreeSet<(String, String)> {
        self.marked("Post-boot only")
    }

    fn marked(&self, marker: &str) -> BTreeSet<(String, String)> {
        let mut out = BTreeSet::new();
        let Some(paths) = self.doc["paths"].as_mapping() else {
            return out;
        };
        for (template, ops) in paths {
            let (Some(template), Some(ops)) = (template.as_str(), ops.as_mapping()) else {
                continue;
            };
            for (method, op) in ops {
                let summary = op["summary"].as_str().unwrap_or_default();
                if let (Some(m), true) = (method.as_str(), summary.contains(marker)) {
                    out.insert((m.to_ascii_uppercase(), template.to_string()));
                }
            }
        }
        out
    }

    /// Checks one request on its own: the path and method exist, path
    /// parameters are given, and the body matches the body parameter's
    /// schema (no body where none is declared).
    pub fn check_request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Json>,
    ) -> Result<(), String> {
        let template = self
            .template(path)
            .ok_or_else(|| format!("{path}: no such path in the contract"))?;
        let op = self
            .operation(method, &template)
            .ok_or_else(|| format!("{method} {path}: {template} has no {method}"))?;
        let params = op["parameters"].as_sequence().cloned().unwrap_or_default();
        let body_param = params.iter().find(|p| p["in"].as_str() == Some("body"));
        match (body_param, body) {
            (None, Some(_)) => Err(format!("{method} {path}: takes no body")),
            (Some(p), None) if p["required"].as_bool() == Some(true) => {
                Err(format!("{method} {path}: the body is required"))
            }
            (Some(p), Some(body)) => self
                .check_value(&p["schema"], body, &format!("{method} {path} body"))
                .and_then(|()| path_ids_match(&template, path, body)),
            _ => Ok(()),
        }
    }

    fn resolve<'a>(&'a self, schema: &'a Yaml) -> Result<&'a Yaml, String> {
        let Some(r) = schema["$ref"].as_str() else {
            return Ok(schema);
        };
        let name = r
            .strip_prefix("#/definitions/")
            .ok_or_else(|| format!("unsupported $ref {r}"))?;
        let def = &self.doc["definitions"][name];
        if def.is_null() {
            return Err(format!("$ref {r} names no definition"));
        }
        Ok(def)
    }

    /// `value` against `schema`: `type`, `enum`, `required`, `properties`
    /// (a property the schema does not declare is an error unless it says
    /// `additionalProperties: true`: Firecracker rejects unknown fields),
    /// `readOnly`, `minimum`/`maximum`, `items`.
    fn check_value(&self, schema: &Yaml, value: &Json, at: &str) -> Result<(), String> {
        let schema = self.resolve(schema)?;
        if let Some(allowed) = schema["enum"].as_sequence() {
            if !allowed.iter().any(|a| yaml_eq_json(a, value)) {
                return Err(format!(
                    "{at}: {value} is not one of {}",
                    yaml_list(allowed)
                ));
            }
        }
        match schema["type"].as_str() {
            Some("object") => self.check_object(schema, value, at),
            Some("array") => {
                let items = value
                    .as_array()
                    .ok_or_else(|| format!("{at}: {value} is not an array"))?;
                for (i, item) in items.iter().enumerate() {
                    self.check_value(&schema["items"], item, &format!("{at}[{i}]"))?;
                }
                Ok(())
            }
            Some("string") => expect(value.is_string(), at, value, "a string"),
            Some("boolean") => expect(value.is_boolean(), at, value, "a boolean"),
            Some("number") => expect(value.is_number(), at, value, "a number"),
            Some("integer") => check_integer(schema, value, at),
            Some(other) => Err(format!("{at}: unsupported schema type {other}")),
            None => Ok(()),
        }
    }

    fn check_object(&self, schema: &Yaml, value: &Json, at: &str) -> Result<(), String> {
        let obj = value
            .as_object()
            .ok_or_else(|| format!("{at}: {value} is not an object"))?;
        for req in schema["required"].as_sequence().into_iter().flatten() {
            let name = req.as_str().unwrap_or_default();
            if !obj.contains_key(name) {
                return Err(format!("{at}: required field {name} is missing"));
            }
        }
        let props = &schema["properties"];
        let open = schema["additionalProperties"].as_bool() == Some(true);
        for (name, v) in obj {
            let prop = &props[name.as_str()];
            if prop.is_null() {
                if open {
                    continue;
                }
                return Err(format!("{at}: unknown field {name}"));
            }
            if prop["readOnly"].as_bool() == Some(true) {
                return Err(format!("{at}: field {name} is read-only"));
            }
            self.check_value(prop, v, &format!("{at}.{name}"))?;
        }
        Ok(())
    }
}

/// Firecracker refuses a body whose id differs from the path's
/// (`PUT /drives/a` with `drive_id: b`): a path parameter named like a
/// body field must equal it.
fn path_ids_match(template: &str, path: &str, body: &Json) -> Result<(), String> {
    for (t, s) in template.split('/').zip(path.split('/')) {
        let Some(name) = t.strip_prefix('{').and_then(|t| t.strip_suffix('}')) else {
            continue;
        };
        if let Some(v) = body.get(name) {
            if v.as_str() != Some(s) {
                return Err(format!(
                    "{path}: body {name} {v} differs from the path's {s}"
                ));
            }
        }
    }
    Ok(())
}

fn check_integer(schema: &Yaml, value: &Json, at: &str) -> Result<(), String> {
    let n = value
        .as_i64()
        .ok_or_else(|| format!("{at}: {value} is not an integer"))?;
    if let Some(min) = schema["minimum"].as_i64().filter(|m| n < *m) {
        return Err(format!("{at}: {n} is below the minimum {min}"));
    }
    if let Some(max) = schema["maximum"].as_i64().filter(|m| n > *m) {
        return Err(format!("{at}: {n} is above the maximum {max}"));
    }
    Ok(())
}

fn expect(ok: bool, at: &str, value: &Json, what: &str) -> Result<(), String> {
    match ok {
        true => Ok(()),
        false => Err(format!("{at}: {value} is not {what}")),
    }
}

fn yaml_eq_json(y: &Yaml, j: &Json) -> bool {
    match (y, j) {
        (Yaml::String(a), Json::String(b)) => a == b,
        (Yaml::Bool(a), Json::Bool(b)) => a == b,
        (Yaml::Number(a), Json::Number(b)) => a.as_i64().is_some() && a.as_i64() == b.as_i64(),
        _ => false,
    }
}

fn yaml_list(items: &[Yaml]) -> String {
    let names: Vec<String> = items
        .iter()
        .map(|i| {
            serde_yaml::to_string(i)
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .collect();
    names.join(", ")
}

/// Where a Firecracker process is in its life, as far as the API's order
/// rules go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Nothing configured but (perhaps) logger and metrics: a snapshot may
    /// still be loaded.
    Fresh,
    /// Boot resources configured, not started.
    Configuring,
    /// The guest runs.
    Running,
    /// The guest is paused.
    Paused,
}

/// A sequence of requests to one Firecracker process, checked in order.
#[derive(Debug)]
pub struct Session<'a> {
    spec: &'a Spec,
    phase: Phase,
    pre_boot: BTreeSet<(String, String)>,
    post_boot: BTreeSet<(String, String)>,
    done: BTreeSet<String>,
}

impl<'a> Session<'a> {
    /// A process in `phase`.
    pub fn new(spec: &'a Spec, phase: Phase) -> Self {
        Self {
            spec,
            phase,
            pre_boot: spec.pre_boot_only(),
            post_boot: spec.post_boot_only(),
            done: BTreeSet::new(),
        }
    }

    /// Where the process is now.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Checks one request, then moves the process on.
    pub fn apply(&mut self, method: &str, path: &str, body: Option<&Json>) -> Result<(), String> {
        self.spec.check_request(method, path, body)?;
        let template = self.spec.template(path).unwrap_or_default();
        let key = (method.to_string(), template.clone());
        let started = matches!(self.phase, Phase::Running | Phase::Paused);
        let at = format!("{method} {path} ({:?})", self.phase);
        let field = |name: &str| {
            body.and_then(|b| b.get(name))
                .cloned()
                .unwrap_or(Json::Null)
        };
        self.phase = match (method, template.as_str()) {
            // The logger and metrics are configured once, before the
            // start; /snapshot/load's description allows them before it.
            ("PUT", "/logger" | "/metrics") => {
                if started || !self.done.insert(template.clone()) {
                    return Err(format!("{at}: configured after the start or twice"));
                }
                self.phase
            }
            ("PUT", "/snapshot/load") => match self.phase {
                Phase::Fresh => match field("resume_vm").as_bool() {
                    Some(true) => Phase::Running,
                    _ => Phase::Paused,
                },
                _ => return Err(format!("{at}: only a fresh process loads a snapshot (nothing configured but logger and metrics)")),
            },
            ("PUT", "/actions") => self.action(&field("action_type"), &at)?,
            ("PATCH", "/vm") => match (started, field("state").as_str()) {
                (true, Some("Paused")) => Phase::Paused,
                (true, _) => Phase::Running,
                (false, _) => return Err(format!("{at}: the VM has not started")),
            },
            ("PUT", "/snapshot/create") if self.phase != Phase::Paused => {
                return Err(format!("{at}: a snapshot is taken of a paused VM only"));
            }
            _ if self.pre_boot.contains(&key) => {
                if started {
                    return Err(format!("{at}: pre-boot only"));
                }
                self.done.insert(template);
                Phase::Configuring
            }
            _ if self.post_boot.contains(&key) && !started => {
                return Err(format!("{at}: post-boot only"));
            }
            _ => self.phase,
        };
        Ok(())
    }

    fn action(&self, action: &Json, at: &str) -> Result<Phase, String> {
        let started = matches!(self.phase, Phase::Running | Phase::Paused);
        match action.as_str() {
            Some("InstanceStart") if started => Err(format!("{at}: already started")),
            Some("InstanceStart") if !self.done.contains("/boot-source") => {
                Err(format!("{at}: no boot source configured"))
            }
            Some("InstanceStart") => Ok(Phase::Running),
            _ if !started => Err(format!("{at}: {action} needs a started VM")),
            _ => Ok(self.phase),
        }
    }
}
