// CVG canvas helpers. Dependency-free; classic app.registerExtension API, which both the current
// ComfyUI frontend and the March-2024 frontend support.
//  * CVG Save Video / CVG Decode To Video: the saved video plays inside the node (<video>, muted, looping).
//  * CVG Load Video: an upload button and a preview of the selected file.
//  * Frame-count widgets of CVG nodes show the latent frame count, and a warning when the count is not 4k+1.
//  * Right-click a CVG video node: "Open video in a new tab".
import { app } from "../../scripts/app.js";

const EXT = "comfyui-cvg.canvas";
const SAVERS = new Set(["CVGSaveVideo", "CVGDecodeToVideo"]);
const LOADER = "CVGLoadVideo";
// Widgets holding a pixel frame count that the Wan VAE maps exactly only when it is 4k+1.
const FRAME_WIDGETS = new Set(["length", "num_frames", "frames", "frame_count", "video_length", "frame_cap",
  "segment_length", "overlap_frames"]);
const VIDEO_EXT = /\.(mp4|webm|mov|m4v|ogv)$/i;
const IMAGE_EXT = /\.(gif|webp|png)$/i;

function viewUrl(entry) {
  const q = new URLSearchParams({
    filename: entry.filename,
    subfolder: entry.subfolder || "",
    type: entry.type || "output",
    rand: String(Math.random()),
  });
  // Relative, so it also works when ComfyUI is served under a sub-path.
  return "view?" + q.toString();
}

function splitName(value) {
  let type = "input";
  let name = String(value || "");
  const m = name.match(/^(.*) \[(input|output|temp)\]$/);
  if (m) {
    name = m[1];
    type = m[2];
  }
  const slash = name.lastIndexOf("/");
  return {
    filename: slash >= 0 ? name.slice(slash + 1) : name,
    subfolder: slash >= 0 ? name.slice(0, slash) : "",
    type,
  };
}

// ------------------------------------------------------------------------------------------ preview

function ensurePreview(node) {
  if (node.cvgPreview) return node.cvgPreview;
  const box = document.createElement("div");
  box.className = "cvg-preview";
  Object.assign(box.style, { width: "100%", height: "100%", display: "flex", alignItems: "center",
    justifyContent: "center", overflow: "hidden" });
  const video = document.createElement("video");
  video.className = "cvg-video-preview";
  Object.assign(video, { muted: true, loop: true, autoplay: true, controls: true, playsInline: true });
  video.setAttribute("muted", "");
  Object.assign(video.style, { maxWidth: "100%", maxHeight: "100%", width: "100%", objectFit: "contain" });
  const img = document.createElement("img");
  img.className = "cvg-image-preview";
  Object.assign(img.style, { maxWidth: "100%", maxHeight: "100%", objectFit: "contain", display: "none" });
  const note = document.createElement("div");
  note.className = "cvg-preview-note";
  Object.assign(note.style, { fontSize: "11px", opacity: "0.8", textAlign: "center", display: "none" });
  box.append(video, img, note);
  let aspect = 9 / 16;
  const height = () => Math.max(64, Math.round((node.size?.[0] ?? 256) * aspect));
  const widget = node.addDOMWidget("cvg_preview", "cvg_preview", box, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: height,
    getHeight: height,
    getMaxHeight: () => height() + 8,
  });
  widget.serialize = false;
  const fit = (w, h) => {
    if (w > 0 && h > 0) aspect = h / w;
    const size = node.computeSize?.() ?? node.size;
    node.setSize?.([Math.max(node.size[0], size[0]), size[1]]);
    node.graph?.setDirtyCanvas(true, true);
  };
  video.addEventListener("loadedmetadata", () => fit(video.videoWidth, video.videoHeight));
  img.addEventListener("load", () => fit(img.naturalWidth, img.naturalHeight));
  video.addEventListener("error", () => {
    if (!video.getAttribute("src")) return;
    video.style.display = "none";
    note.style.display = "";
    note.textContent = "This browser cannot play the preview; the file was saved.";
  });
  node.cvgPreview = { box, video, img, note, widget };
  return node.cvgPreview;
}

function showMedia(node, entry) {
  const p = ensurePreview(node);
  const url = viewUrl(entry);
  node.cvgLastUrl = url;
  const isVideo = (entry.mime && entry.mime.startsWith("video/")) || VIDEO_EXT.test(entry.filename);
  const isImage = (entry.mime && entry.mime.startsWith("image/")) || IMAGE_EXT.test(entry.filename);
  p.note.style.display = "none";
  if (isVideo && entry.playable !== false) {
    p.img.style.display = "none";
    p.img.removeAttribute("src");
    p.video.style.display = "";
    p.video.src = url;
    p.video.play?.().catch(() => {});
  } else if (isImage) {
    p.video.pause?.();
    p.video.removeAttribute("src");
    p.video.style.display = "none";
    p.img.style.display = "";
    p.img.src = url;
  } else {
    p.video.removeAttribute("src");
    p.video.style.display = "none";
    p.img.style.display = "none";
    p.note.style.display = "";
    const what = entry.format ? `${entry.format} ` : "";
    p.note.textContent = `Saved ${what}${entry.subfolder ? entry.subfolder + "/" : ""}${entry.filename}` +
      (entry.frames ? ` (${entry.frames} frames)` : "") + " — browsers cannot preview this format.";
  }
}

function hidePreview(node) {
  const p = node.cvgPreview;
  if (!p) return;
  p.video.pause?.();
  p.video.removeAttribute("src");
  p.video.style.display = "none";
  p.img.removeAttribute("src");
  p.img.style.display = "none";
  p.note.style.display = "none";
}

// ----------------------------------------------------------------------------------- frame counts

export function frameHint(n) {
  n = Math.round(Number(n));
  if (!Number.isFinite(n) || n <= 0) return "";
  if ((n - 1) % 4 === 0) return `${Math.floor((n - 1) / 4) + 1} latent`;
  const lower = Math.max(1, Math.floor((n - 1) / 4) * 4 + 1);
  return `⚠ not 4k+1: use ${lower} or ${lower + 4}`;
}

function attachFrameHint(node, widget, opts) {
  if (widget.cvgHint) return;
  widget.cvgHint = true;
  const base = widget.label || widget.name;
  // A "min 1 (or 5, ...), step 4" widget means 1, 5, 9, ...; the March-2024 frontend rounds INT values to
  // multiples of the step (81 -> 80) instead, so snap back onto the 4k+1 grid after its rounding.
  const min = Number(opts?.min ?? 0);
  const snap = Number(opts?.step) === 4 && min >= 1 && (min - 1) % 4 === 0;
  const update = () => {
    const hint = frameHint(widget.value);
    widget.label = hint ? `${base} (${hint})` : base;
    widget.cvgHintText = hint;
    node.graph?.setDirtyCanvas(true, false);
  };
  const cb = widget.callback;
  widget.callback = function () {
    const r = cb?.apply(this, arguments);
    if (snap && Number.isFinite(Number(widget.value))) {
      const v = Math.max(min, min + Math.round((Number(widget.value) - min) / 4) * 4);
      if (v !== widget.value) widget.value = v;
    }
    update();
    return r;
  };
  update();
  node.cvgHintUpdaters = (node.cvgHintUpdaters || []).concat(update);
}

function frameSpec(nodeData, name) {
  const spec = nodeData?.input?.required?.[name] ?? nodeData?.input?.optional?.[name];
  return spec?.[1] ?? {};
}

function isFrameWidget(nodeData, widget) {
  if (!widget || widget.type !== "number" || !FRAME_WIDGETS.has(widget.name)) return false;
  const opts = frameSpec(nodeData, widget.name);
  if (opts.cvg_4k1 === false) return false;
  if (opts.cvg_4k1 === true) return true;
  // AnimateDiff context lengths are not Wan frame counts.
  return !String(nodeData?.category || "").toLowerCase().includes("animatediff");
}

// --------------------------------------------------------------------------------------- uploads

async function uploadVideo(node, file) {
  const body = new FormData();
  body.append("image", file, file.name);
  const resp = await fetch("upload/image", { method: "POST", body });
  if (resp.status !== 200) throw new Error(`upload failed: HTTP ${resp.status} ${resp.statusText}`);
  const data = await resp.json();
  const name = data.subfolder ? `${data.subfolder}/${data.name}` : data.name;
  const combo = node.widgets?.find((w) => w.name === "video");
  if (combo) {
    const values = combo.options?.values;
    if (Array.isArray(values) && !values.includes(name)) values.push(name);
    combo.value = name;
    combo.callback?.(name);
  }
  return name;
}

function addUploadButton(node) {
  const input = document.createElement("input");
  Object.assign(input, { type: "file", accept: "video/*,image/gif,image/webp,.mkv" });
  input.style.display = "none";
  input.className = "cvg-upload-input";
  document.body.append(input);
  input.addEventListener("change", async () => {
    if (!input.files?.length) return;
    try {
      await uploadVideo(node, input.files[0]);
    } catch (e) {
      console.warn(`[${EXT}]`, e);
      alert?.(`CVG Load Video: ${e.message}`);
    } finally {
      input.value = "";
    }
  });
  // Named "upload" and appended after the node's own widgets, like the frontends' upload buttons, so
  // saved widgets_values keep the same layout in both frontends.
  const btn = node.addWidget("button", "upload", "video", () => input.click(), { serialize: false });
  btn.label = "choose video to upload";
  const removed = node.onRemoved;
  node.onRemoved = function () {
    input.remove();
    return removed?.apply(this, arguments);
  };
}

function previewSelected(node) {
  const combo = node.widgets?.find((w) => w.name === "video");
  if (!combo?.value) return;
  const entry = splitName(combo.value);
  entry.playable = VIDEO_EXT.test(entry.filename) && !/\.mkv$/i.test(entry.filename);
  showMedia(node, entry);
}

// ------------------------------------------------------------------------- workflows in video files
// Reads what CVG Save Video embeds (and current ComfyUI's video savers): mp4/mov udta/meta keys+ilst,
// Matroska/WebM SimpleTags, the GIF comment "CVG-METADATA:{...}". Used when a file is dropped on the canvas.

const HEAD_BYTES = 64 * 1024 * 1024;
const td = new TextDecoder();

function findBox(d, start, end, name) {
  const n = [...name].map((c) => c.charCodeAt(0));
  for (let i = start; i + 8 <= end; i++) {
    if (d[i + 4] === n[0] && d[i + 5] === n[1] && d[i + 6] === n[2] && d[i + 7] === n[3]) {
      const size = ((d[i] << 24) >>> 0) + (d[i + 1] << 16) + (d[i + 2] << 8) + d[i + 3];
      if (size >= 8 && i + size <= end) return [i, i + size];
    }
  }
  return null;
}

function readU32(d, i) {
  return ((d[i] << 24) >>> 0) + (d[i + 1] << 16) + (d[i + 2] << 8) + d[i + 3];
}

export function mp4Metadata(d) {
  const out = {};
  const keys = findBox(d, 0, d.length, "keys");
  const ilst = findBox(d, 0, d.length, "ilst");
  if (!keys || !ilst) return out;
  const names = [];
  let p = keys[0] + 16; // size, 'keys', version/flags, count
  while (p + 8 <= keys[1]) {
    const size = readU32(d, p);
    if (size < 8) break;
    names.push(td.decode(d.subarray(p + 8, p + size)));
    p += size;
  }
  p = ilst[0] + 8;
  while (p + 8 <= ilst[1]) {
    const size = readU32(d, p);
    if (size < 8) break;
    const index = readU32(d, p + 4);
    const data = findBox(d, p + 8, p + size, "data");
    if (data && names[index - 1]) out[names[index - 1].toLowerCase()] = td.decode(d.subarray(data[0] + 16, data[1]));
    p += size;
  }
  return out;
}

function vint(d, i, keepMarker) {
  const first = d[i];
  let len = 1;
  while (len <= 8 && !(first & (0x80 >> (len - 1)))) len++;
  if (len > 8) return null;
  let value = keepMarker ? first : first & (0xff >> len);
  for (let k = 1; k < len; k++) value = value * 256 + d[i + k];
  return [value, len];
}

export function matroskaMetadata(d) {
  const out = {};
  for (let i = 0; i + 4 < d.length; i++) {
    if (d[i] !== 0x67 || d[i + 1] !== 0xc8) continue; // SimpleTag
    const size = vint(d, i + 2);
    if (!size) continue;
    let p = i + 2 + size[1];
    const end = Math.min(d.length, p + size[0]);
    let name = null;
    let value = null;
    while (p < end) {
      const id = vint(d, p, true);
      if (!id) break;
      const len = vint(d, p + id[1]);
      if (!len) break;
      const body = p + id[1] + len[1];
      if (id[0] === 0x45a3) name = td.decode(d.subarray(body, body + len[0]));
      else if (id[0] === 0x4487) value = td.decode(d.subarray(body, body + len[0]));
      p = body + len[0];
    }
    if (name && value !== null) out[name.toLowerCase()] = value;
  }
  return out;
}

export function gifMetadata(d) {
  const tag = [...GIF_TAG].map((c) => c.charCodeAt(0));
  for (let i = d.length - tag.length - 3; i >= 0; i--) {
    if (d[i] !== 0x21 || d[i + 1] !== 0xfe) continue;
    if (!tag.every((c, k) => d[i + 3 + k] === c)) continue;
    const parts = [];
    let p = i + 2;
    while (p < d.length && d[p] !== 0) {
      parts.push(d.subarray(p + 1, p + 1 + d[p]));
      p += 1 + d[p];
    }
    const text = parts.map((x) => td.decode(x)).join("").slice(GIF_TAG.length);
    try {
      return Object.fromEntries(Object.entries(JSON.parse(text)).map(([k, v]) => [k.toLowerCase(), v]));
    } catch {
      return {};
    }
  }
  return {};
}
const GIF_TAG = "CVG-METADATA:";

async function videoFileMetadata(file) {
  const name = (file.name || "").toLowerCase();
  const isGif = file.type === "image/gif" || name.endsWith(".gif");
  const slice = isGif ? file.slice(Math.max(0, file.size - 8 * 1024 * 1024)) : file.slice(0, HEAD_BYTES);
  const d = new Uint8Array(await slice.arrayBuffer());
  if (isGif) return gifMetadata(d);
  if (d[0] === 0x1a && d[1] === 0x45 && d[2] === 0xdf && d[3] === 0xa3) return matroskaMetadata(d);
  if (td.decode(d.subarray(4, 8)) === "ftyp") return mp4Metadata(d);
  return {};
}

function isVideoFile(file) {
  const name = (file?.name || "").toLowerCase();
  return /^video\//.test(file?.type || "") || file?.type === "image/gif" || /\.(mp4|m4v|mov|webm|mkv|gif)$/.test(name);
}

function parseJson(value) {
  if (value == null) return null;
  if (typeof value !== "string") return value;
  try {
    return JSON.parse(value);
  } catch {
    return null;
  }
}

// ------------------------------------------------------------------------------------- extension

app.registerExtension({
  name: EXT,

  async setup() {
    // Dropping a video saved with its workflow restores the workflow. Both frontends route drops
    // through app.handleFile; anything that is not a video with a workflow goes to the original.
    const original = app.handleFile?.bind(app);
    if (!original) return;
    app.handleFile = async function (file, ...rest) {
      if (isVideoFile(file)) {
        try {
          const meta = await videoFileMetadata(file);
          const workflow = parseJson(meta.workflow);
          if (workflow?.nodes) {
            await app.loadGraphData(workflow);
            return;
          }
          const prompt = parseJson(meta.prompt);
          if (prompt && typeof prompt === "object" && app.loadApiJson && Object.values(prompt).every((v) => v?.class_type)) {
            app.loadApiJson(prompt);
            return;
          }
        } catch (e) {
          console.warn(`[${EXT}] could not read the workflow from ${file.name}:`, e);
        }
      }
      return original(file, ...rest);
    };
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("CVG")) return;
    const name = nodeData.name;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      try {
        for (const w of this.widgets || []) if (isFrameWidget(nodeData, w)) attachFrameHint(this, w, frameSpec(nodeData, w.name));
        // The current frontend builds its own upload widget + preview from `video_upload`; only the
        // old frontend needs ours.
        if (name === LOADER && !this.widgets?.some((w) => w.name === "upload" || w.type === "button")) {
          this.cvgOwnUpload = true;
          addUploadButton(this);
          const combo = this.widgets?.find((w) => w.name === "video");
          if (combo) {
            const cb = combo.callback;
            combo.callback = (...args) => {
              const out = cb?.apply(combo, args);
              previewSelected(this);
              return out;
            };
          }
          requestAnimationFrame(() => previewSelected(this));
        }
      } catch (e) {
        console.warn(`[${EXT}] could not set up ${name}:`, e);
      }
      return r;
    };

    // The old frontend serialises every widget positionally, the preview too (as null): drop that slot so
    // a workflow saved from either frontend has the same widgets_values.
    const onSerialize = nodeType.prototype.onSerialize;
    nodeType.prototype.onSerialize = function (o) {
      const r = onSerialize?.apply(this, arguments);
      const ws = this.widgets || [];
      if (Array.isArray(o?.widgets_values) && o.widgets_values.length === ws.length) {
        o.widgets_values = o.widgets_values.filter((_, i) => ws[i]?.name !== "cvg_preview");
      }
      return r;
    };

    // Widget values restored from a saved workflow do not fire callbacks: refresh the hints.
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const r = onConfigure?.apply(this, arguments);
      for (const u of this.cvgHintUpdaters || []) u();
      if (name === LOADER && this.cvgOwnUpload) requestAnimationFrame(() => previewSelected(this));
      return r;
    };

    if (SAVERS.has(name)) {
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        const r = onExecuted?.apply(this, arguments);
        const entry = message?.cvg_video?.[message.cvg_video.length - 1];
        if (entry) {
          try {
            if (message.images?.length) {
              // gif / webp / png frame: the frontend's own image preview shows it; do not double it.
              this.cvgLastUrl = viewUrl(entry);
              hidePreview(this);
            } else {
              showMedia(this, entry);
            }
          } catch (e) {
            console.warn(`[${EXT}] preview failed:`, e);
          }
        }
        return r;
      };
    }

    if (SAVERS.has(name) || name === LOADER) {
      const getExtraMenuOptions = nodeType.prototype.getExtraMenuOptions;
      nodeType.prototype.getExtraMenuOptions = function (_, options) {
        const r = getExtraMenuOptions?.apply(this, arguments);
        if (this.cvgLastUrl && Array.isArray(options)) {
          options.unshift({ content: "Open video in a new tab", callback: () => window.open(this.cvgLastUrl, "_blank") });
        }
        return r;
      };
    }
  },

  async afterConfigureGraph(missingNodeTypes) {
    const missing = (missingNodeTypes || []).map((t) => (typeof t === "string" ? t : t?.type)).filter(Boolean);
    const cvg = missing.filter((t) => String(t).startsWith("CVG"));
    window.__cvgMissing = cvg;
    if (cvg.length) console.warn(`[${EXT}] this workflow needs CVG nodes this server does not have:`, cvg.join(", "));
  },
});
