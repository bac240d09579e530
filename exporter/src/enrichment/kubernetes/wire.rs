//! The parts of the API objects that are read, and the watch stream's events.

use std::collections::HashMap;

use serde::Deserialize;

use super::KubernetesError;

// The parts of the API objects that are read.

#[derive(Debug, Deserialize)]
pub(super) struct PodList {
    #[serde(default)]
    pub(super) metadata: ListMeta,
    #[serde(default)]
    pub(super) items: Vec<Pod>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ListMeta {
    #[serde(default)]
    pub(super) resource_version: String,
    #[serde(default, rename = "continue")]
    pub(super) continue_token: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct Pod {
    #[serde(default)]
    pub(super) metadata: ObjectMeta,
    #[serde(default)]
    pub(super) status: PodStatus,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ObjectMeta {
    pub(super) name: Option<String>,
    pub(super) namespace: Option<String>,
    pub(super) uid: Option<String>,
    pub(super) resource_version: Option<String>,
    #[serde(default)]
    pub(super) annotations: HashMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct PodStatus {
    #[serde(default)]
    pub(super) container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    pub(super) init_container_statuses: Vec<ContainerStatus>,
    #[serde(default)]
    pub(super) ephemeral_container_statuses: Vec<ContainerStatus>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ContainerStatus {
    #[serde(default)]
    pub(super) name: String,
    #[serde(rename = "containerID")]
    pub(super) container_id: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct WatchEvent {
    #[serde(rename = "type")]
    pub(super) kind: String,
    pub(super) object: serde_json::Value,
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct Status {
    #[serde(default)]
    pub(super) code: u16,
    #[serde(default)]
    pub(super) reason: String,
    #[serde(default)]
    pub(super) message: String,
}

/// One decoded watch event.
#[derive(Debug)]
pub(super) enum Change {
    Upsert(Pod),
    Delete(Pod),
    Bookmark(String),
    Gone,
    Error(Status),
    Ignored,
}

pub(super) fn decode_event(line: &[u8]) -> Result<Change, KubernetesError> {
    let event: WatchEvent = serde_json::from_slice(line)
        .map_err(|err| KubernetesError::Malformed(format!("watch event: {err}")))?;
    let pod = |object| {
        serde_json::from_value::<Pod>(object)
            .map_err(|err| KubernetesError::Malformed(format!("{} pod: {err}", event.kind)))
    };
    Ok(match event.kind.as_str() {
        "ADDED" | "MODIFIED" => Change::Upsert(pod(event.object)?),
        "DELETED" => Change::Delete(pod(event.object)?),
        "BOOKMARK" => Change::Bookmark(
            pod(event.object)?
                .metadata
                .resource_version
                .unwrap_or_default(),
        ),
        "ERROR" => {
            let status: Status = serde_json::from_value(event.object).unwrap_or_default();
            if status.code == 410 {
                Change::Gone
            } else {
                Change::Error(status)
            }
        }
        _ => Change::Ignored,
    })
}
